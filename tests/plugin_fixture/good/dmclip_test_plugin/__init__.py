"""A third-party dmclip plugin, as a user would write one: importing it registers a student and a teacher
reference scheme."""

from torch import nn

from dmclip.registry import losses, references, students


@students.register("plugin-echo", tiny={"width": 4})
def plugin_echo(width: int = 8) -> nn.Module:
    """A one-layer student from the test plugin"""
    return nn.Linear(width, width)


@references.register("plugin-tiny", description="plugin-tiny:<seed> — a random tiny CLIP (test plugin)")
def plugin_tiny(rest: str) -> nn.Module:
    import torch

    from dmclip.models.base import build_model
    from dmclip.models.clip import clip_arch

    torch.manual_seed(int(rest))
    return build_model(clip_arch(32, 8, 32, 1, 2, 32, 1, 2, 32))


def register_losses() -> None:
    """The second entry point names this function: dmclip calls it once."""

    @losses.register("plugin-zero", description="always zero (test plugin)")
    def plugin_zero(**kwargs):
        return lambda *args: {"loss": 0.0}
