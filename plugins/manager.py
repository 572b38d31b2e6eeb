"""The process-wide plugin manager: built-ins first, then entry-point plugins.

Selection follows vLLM's ``VLLM_PLUGINS`` (``LORAPLEX_PLUGINS`` here, either name works):

* unset: every installed plugin that is default-on (a plugin opts out with a module or object
  attribute ``LORAPLEX_DEFAULT_ON = False``; it then loads only when named);
* empty string: no entry-point plugin at all;
* ``a,b``: exactly the plugins named ``a`` and ``b`` (entry-point names), default-on or not.

Built-ins (the PEFT adapter loader and the bridge to ``LoRAResolverRegistry``) are always
registered, and registered first, so a plugin's ``firstresult`` answer wins over them.
"""
from __future__ import annotations

import logging
import threading
from importlib.metadata import EntryPoint, entry_points

import pluggy

from loraplex import envs
from loraplex.plugins import PROJECT_NAME, hookspecs

logger = logging.getLogger("loraplex.plugins")

ENTRY_POINT_GROUPS = ("loraplex.plugins", "vllm.general_plugins")
DEFAULT_ON_ATTR = "LORAPLEX_DEFAULT_ON"

# Reentrant: a plugin's loader may itself call get_plugin_manager() (e.g. to register an object).
_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_building: pluggy.PluginManager | None = None
_loaded: list[str] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager, built and loaded on first use (thread-safe)."""
    global _manager
    manager = _manager
    if manager is not None:
        return manager
    with _lock:
        if _building is not None:
            return _building  # called from a plugin while it loads: the manager it is loading into
        if _manager is None:
            _manager = _build()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the manager so the next ``get_plugin_manager()`` reloads (tests, env changes)."""
    global _manager
    with _lock:
        _manager = None
        _loaded.clear()


def loaded_plugin_names() -> list[str]:
    """Entry-point plugins loaded into the manager (registered or, for plain callables, called)."""
    get_plugin_manager()
    return list(_loaded)


def new_plugin_manager() -> pluggy.PluginManager:
    """A manager with the hook specs and the built-ins but no entry-point plugins."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    _register_builtins(pm)
    return pm


def _register_builtins(pm: pluggy.PluginManager) -> None:
    try:
        # Guarded so the plugin system still works in a partial install; the engine imports it directly.
        from loraplex.lora import peft_loader
    except ImportError as e:
        logger.debug("built-in PEFT loader not available: %s", e)
    else:
        pm.register(peft_loader, name="loraplex.builtin.peft_loader")
    from loraplex.lora.resolver import ResolverRegistryBridge

    pm.register(ResolverRegistryBridge(), name="loraplex.builtin.resolver_registry")


def _build() -> pluggy.PluginManager:
    global _building
    pm = _building = new_plugin_manager()
    try:
        _load_entry_points(pm)
    finally:
        _building = None
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    selected = envs.plugins()
    eps = _discover()
    for name in eps:
        if selected is not None and name not in selected:
            pm.set_blocked(name)
    if selected is not None:
        for name in selected:
            if name not in eps:
                logger.warning("plugin %r named in LORAPLEX_PLUGINS is not installed; installed plugins: %s",
                               name, sorted(eps) or "none")
    for name, ep in eps.items():
        if pm.is_blocked(name):
            continue
        _load(pm, name, ep, explicit=selected is not None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        logger.warning("a plugin implements a hook loraplex does not define: %s", e)
    logger.info("plugins loaded: %s", ", ".join(_loaded) or "none")


def _discover() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            known = found.get(ep.name)
            # The same distribution can be visible twice on sys.path (editable + target dir).
            if known is not None and known.value != ep.value:
                logger.warning("plugin name %r is declared twice (%s and %s); keeping the first", ep.name,
                               known.value, ep.value)
            found.setdefault(ep.name, ep)
    return found


def _has_hookimpls(obj: object) -> bool:
    marker = PROJECT_NAME + "_impl"
    for attr in dir(obj):
        if attr.startswith(PROJECT_NAME + "_"):
            try:
                if hasattr(getattr(obj, attr), marker):
                    return True
            except Exception:  # properties may raise; they are not hook implementations
                continue
    return False


def _load(pm: pluggy.PluginManager, name: str, ep: EntryPoint, explicit: bool) -> None:
    try:
        obj = ep.load()
    except Exception:
        logger.exception("plugin %r (%s) failed to import; skipping it", name, ep.value)
        return
    if not explicit and getattr(obj, DEFAULT_ON_ATTR, True) is False:
        logger.debug("plugin %r is not default-on; name it in LORAPLEX_PLUGINS to load it", name)
        return
    try:
        if _has_hookimpls(obj):
            pm.register(obj, name=name)
        elif callable(obj):
            # vLLM general-plugin style: a function run once per process for its side effects
            # (e.g. LoRAResolverRegistry.register_resolver); a returned plugin object is registered.
            result = obj()
            if result is not None and _has_hookimpls(result):
                pm.register(result, name=name)
        else:
            logger.warning("plugin %r (%s) has no loraplex hook implementations and is not callable; "
                           "skipping it", name, ep.value)
            return
    except Exception:
        logger.exception("plugin %r (%s) raised while loading; skipping it", name, ep.value)
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        return
    _loaded.append(name)
