"""Plugin system: pluggy hook specs (hookspecs.py) and the plugin manager (manager.py)."""
import pluggy

PROJECT_NAME = "loraplex"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookspec", "hookimpl", "get_plugin_manager"]


def get_plugin_manager():
    from loraplex.plugins.manager import get_plugin_manager as _get

    return _get()
