#!/usr/bin/env bash
# Set up (if needed) and serve the embedded default model with the demo adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if ! python -c "import loraplex.server.cli" 2>/dev/null; then
    echo "server not built yet"
    exit 1
fi
exec loraplex serve "$@"
