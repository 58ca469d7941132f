"""Stage commands forked from the warm server (flows.stage_runner) behave as `python -m`."""
import signal
import textwrap

from flows import stage_runner


def _collect(into: list):
    return lambda stream: into.extend(line.rstrip("\n") for line in stream)


def test_a_forked_module_gets_its_folder_environment_arguments_and_exit_code(tmp_path):
    (tmp_path / "probe_stage.py").write_text(textwrap.dedent("""
        import os, sys
        print("torch warm:", "torch" in sys.modules)   # imported by the server, not by us
        print("cwd", os.getcwd())
        print("env", os.environ.get("PROBE"), "MIXMERGE_ONLY" in os.environ)
        print("argv", sys.argv[1:])
        print("to stderr", file=sys.stderr)
        sys.exit(2)
    """))
    out, err = [], []
    done = stage_runner.run_module("probe_stage", ["--shard", "3"], str(tmp_path), {"PROBE": "yes"},
                                   _collect(out), _collect(err))
    assert done.returncode == 2
    assert out == ["torch warm: True", f"cwd {tmp_path}", "env yes False", "argv ['--shard', '3']"]
    assert err == ["to stderr"]


def test_a_forked_module_that_raises_or_is_killed_reports_it(tmp_path):
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "killed.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "interrupted.py").write_text("raise KeyboardInterrupt\n")
    err = []
    assert stage_runner.run_module("raises", [], str(tmp_path), {}, _collect([]), _collect(err)).returncode == 1
    assert err[-1] == "RuntimeError: boom" and err[0].startswith("Traceback")
    assert stage_runner.run_module("killed", [], str(tmp_path), {}, _collect([]), _collect([])).returncode \
        == -signal.SIGKILL
    assert stage_runner.run_module("interrupted", [], str(tmp_path), {}, _collect([]), _collect([])).returncode \
        == 128 + signal.SIGINT, "read as an interrupted stage, as `python -m` exits on Ctrl-C"
