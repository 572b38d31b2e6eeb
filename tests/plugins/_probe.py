"""Run in a fresh process by the plugin tests: load the plugin manager as the engine would, resolve
the adapter names given on the command line, and print one JSON line describing what happened.

usage: python _probe.py BASE_MODEL [LORA_NAME...] [--policy]
"""
from __future__ import annotations

import json
import logging
import sys


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record):
        self.records.append({"level": record.levelname, "message": record.getMessage(),
                             "exc": str(record.exc_info[1]) if record.exc_info else None})


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--policy"]
    base, names = args[0], args[1:]
    handler = _Collect()
    logging.getLogger("loraplex").addHandler(handler)
    logging.getLogger("loraplex").setLevel(logging.INFO)

    from loraplex.errors import LoRAError
    from loraplex.lora.resolution import LoRAResolution
    from loraplex.lora.resolver import LoRAResolverRegistry
    from loraplex.plugins.manager import get_plugin_manager, loaded_plugin_names

    pm = get_plugin_manager()
    resolution = LoRAResolution(pm)
    resolved = {}
    for name in names:
        try:
            req = resolution.resolve_sync(base, name, timeout=120)
            resolved[name] = {"path": req.lora_path, "id": req.lora_int_id}
        except LoRAError as e:
            resolved[name] = {"error": f"{type(e).__name__}: {e}"}
    out = {
        "loaded": loaded_plugin_names(),
        "registered": [name for name, p in pm.list_name_plugin() if p is not None],  # in registration order
        # pluggy calls implementations from the end of this list backwards.
        "resolve_order": [impl.plugin_name for impl in reversed(pm.hook.loraplex_resolve_lora.get_hookimpls())],
        "registry": sorted(LoRAResolverRegistry.get_supported_resolvers()),
        "resolved": resolved,
        "logs": handler.records,
    }
    if "--policy" in sys.argv:
        policy = pm.hook.loraplex_scheduling_policy(max_num_seqs=8, max_loras=2)
        out["policy"] = None if policy is None else type(policy).__name__
    resolution.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
