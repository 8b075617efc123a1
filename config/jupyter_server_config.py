# Settings every OpenCloud Jupyter server runs with (see the gateway's
# session origin design). Loaded with --config; a function cannot be given
# on the command line. The server runs in the session's sandbox and serves
# only on a Unix socket in the session's directory.


def _hide_token(handler, page_config):
    # Lab writes the server's token into every page; the gateway injects it
    # on each request instead, so the browser never needs (or sees) it.
    page_config["token"] = ""
    return page_config


c.ServerApp.tornado_settings = {"page_config_hook": _hide_token}  # noqa: F821
# The gateway forwards the browser's Host ({sid}.nb.…); the token guards access.
c.ServerApp.allow_remote_access = True  # noqa: F821
c.ServerApp.open_browser = False  # noqa: F821
# Kernels talk to the server over IPC sockets in the sandbox's private
# runtime directory, never over TCP ports on a loopback.
c.KernelManager.transport = "ipc"  # noqa: F821
