"""A third-party dmclip plugin, as a user would write one: importing it registers a student."""

from torch import nn

from dmclip.registry import losses, students


@students.register("plugin-echo", tiny={"width": 4})
def plugin_echo(width: int = 8) -> nn.Module:
    """A one-layer student from the test plugin"""
    return nn.Linear(width, width)


def register_losses() -> None:
    """The second entry point names this function: dmclip calls it once."""

    @losses.register("plugin-zero", description="always zero (test plugin)")
    def plugin_zero(**kwargs):
        return lambda *args: {"loss": 0.0}
