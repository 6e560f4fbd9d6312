"""A plugin whose dependency is missing: loading it must fail with a clear DmclipError."""

import dmclip_dependency_that_is_not_installed  # noqa: F401
