# Settings every OpenCloud Jupyter server runs with (see docs/decisions.md,
# "The host link"). Loaded with --config; a class cannot be given on the
# command line. The server runs in the session's sandbox and serves only on
# a Unix socket in the session's directory.
from jupyter_server.auth.identity import IdentityProvider, User
from traitlets import default


class LinkIdentityProvider(IdentityProvider):
    """Whoever reaches this server is the session's user.

    The server listens where only the agent and the session's own user can
    connect, and the agent forwards only what a gateway sent after proving
    itself over the host link and checking the user's login. So there is
    no token: nothing a browser could be handed. Requests are never
    "token-authenticated", which keeps Jupyter's own XSRF and Origin checks
    on for every browser request.
    """

    @default("token")
    def _token_default(self):
        return ""

    @default("need_token")
    def _need_token_default(self):
        return False

    def get_user(self, handler):
        return User(username="opencloud", name="You", display_name="You", initials="Y")

    def is_token_authenticated(self, handler):
        return False

    def should_check_origin(self, handler):
        return True

    @property
    def auth_enabled(self):
        return True

    @property
    def login_available(self):
        return False

    @property
    def logout_available(self):
        return False

    def validate_security(self, app, ssl_options=None):
        app.log.info("OpenCloud: authenticated by the host link")


c.ServerApp.identity_provider_class = LinkIdentityProvider  # noqa: F821


def _hide_token(handler, page_config):
    # There is no token; an empty one keeps Lab from asking for one.
    page_config["token"] = ""
    return page_config


c.ServerApp.tornado_settings = {"page_config_hook": _hide_token}  # noqa: F821
# The gateway forwards the browser's Host ({sid}.nb.…), which Jupyter's
# Origin check compares WebSocket origins with.
c.ServerApp.allow_remote_access = True  # noqa: F821
c.ServerApp.open_browser = False  # noqa: F821
# Kernels talk to the server over IPC sockets in the sandbox's private
# runtime directory, never over TCP ports on a loopback.
c.KernelManager.transport = "ipc"  # noqa: F821
