"""One torchrun rank of ``dmclip ARGV`` (see :func:`helpers.torchrun.torchrun_dmclip`).

With ``DIE_AT`` >= 0, rank 1 SIGKILLs itself in pretrain's CLIP loss of that 0-based step: a rank that dies
without a word, as under the OOM killer.
"""

import os
import signal
import sys

die_at = int(os.environ.get("DIE_AT", "-1"))
if die_at >= 0 and os.environ.get("RANK") == "1":
    import dmclip.pretrain as pretrain

    loss = pretrain.ClipTask.loss

    def dying_loss(self, model, batch, step):
        if step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss(self, model, batch, step)

    pretrain.ClipTask.loss = dying_loss

from dmclip.cli.main import main  # noqa: E402  (after the hook, as a user's torchrun would import it)

sys.exit(main(sys.argv[1:]))
