"""loraplex's OpenAI-compatible server (vLLM's routes and bodies). Needs the ``server`` extra.

Imported lazily so that ``loraplex --help`` works without starlette installed.
"""
__all__ = ["create_app", "AsyncEngine", "ProcEngineClient"]


def __getattr__(name):
    if name == "create_app":
        from loraplex.server.app import create_app

        return create_app
    if name == "AsyncEngine":
        from loraplex.server.async_engine import AsyncEngine

        return AsyncEngine
    if name == "ProcEngineClient":
        from loraplex.server.engine_proc import ProcEngineClient

        return ProcEngineClient
    raise AttributeError(name)
