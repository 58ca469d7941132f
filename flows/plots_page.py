"""An HTML page template for `dvc plots show` that needs no network.

DVC's default page loads Vega from a CDN, so on an offline GPU machine it shows nothing and
says nothing. This writes a template with Vega, Vega-Lite and Vega-Embed inlined (the bundle
vl-convert ships) to .dvc/offline_plots.html; .dvc/config names it as plots.html_template, so
plain `dvc plots show` and `dvc plots diff` use it. scripts/setup.sh runs this once.

Run: python -m flows.plots_page [--force]
"""
from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / ".dvc" / "offline_plots.html"
VEGA_LITE = "5.21"  # DVC's templates are Vega-Lite 5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>mixmerge: DVC plots</title>
    <script>%s</script>
    <style>
        body { font-family: sans-serif; }
        body > div { display: inline-block; vertical-align: top; margin: 12px; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>"""


def write(path: Path = TEMPLATE, force: bool = False) -> Path:
    if path.exists() and not force:
        return path
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle.lower() or "{plot_divs}" in bundle:  # would end the tag or be filled by DVC
        raise RuntimeError("the Vega bundle cannot be inlined as it is")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(PAGE % bundle, encoding="utf8")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m flows.plots_page", description=__doc__.split("\n\n")[0])
    cli.add_argument("--force", action="store_true", help="rewrite it even if it exists")
    print(write(force=cli.parse_args().force))
