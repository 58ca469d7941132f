# Sourced by run.sh and test.sh: create .venv from uv.lock (torch and torchvision from PyPI).
# Installs uv with pip if it is missing. Bytecode is compiled at install time: stage
# processes start several times faster when Python need not compile torch and mlflow.
set -euo pipefail
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
else
  python3 -m pip install --quiet --disable-pip-version-check uv
  UV=(python3 -m uv)
fi
"${UV[@]}" sync --frozen --compile-bytecode --quiet
export PATH="$PWD/.venv/bin:$PATH"
# `dvc plots show` draws with Vega inlined in this page (.dvc/config), not from a CDN
[ -f .dvc/offline_plots.html ] || python -m flows.plots_page >/dev/null
