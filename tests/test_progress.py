import io

from pipeline.runtime.progress import Progress


def test_a_log_gets_a_few_lines_only():
    out = io.StringIO()
    p = Progress("mix_train[shard 2]", 100, out)
    for e in range(1, 101):
        p.update(e, 1.0 / e)
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 5
    assert lines[0].startswith("mix_train[shard 2] epoch 1/100 loss 1.0000")
    assert lines[-1].startswith("mix_train[shard 2] epoch 100/100")
    assert "\r" not in out.getvalue()


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_one_live_line():
    out = Tty()
    p = Progress("pretrain", 3, out)
    for e in (1, 2, 3):
        p.update(e, 0.5)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
