"""The terminal view: a live block rewritten in place on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import io

from shardyard.tracking.live import LOAD_PREFIX, PROGRESS_PREFIX, LiveStatus, fold_progress, load_line


def _train(step: int) -> dict:
    return {
        "kind": "train",
        "step": step,
        "loss": 3.0 - 0.1 * step,
        "tokens_per_s": 5000.0,
        "mfu": 0.0123,
        "moe/layer0/util_max": 1.5,
        "moe/layer0/dead": 0.0,
        "moe/layer1/util_max": 2.25,
        "moe/layer1/dead": 2.0,
    }


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_output_gets_plain_periodic_lines() -> None:
    out = io.StringIO()
    # A clock stuck at zero, as time.monotonic() reads on a machine booted moments ago: the first line
    # must print however young the clock is, later ones only once per interval (or at the last step).
    live = LiveStatus(total=10, stream=out, interval_s=3600, clock=lambda: 0.0)
    live(
        [
            _train(1),
            _train(2),
            {"kind": "eval", "step": 5, "val_bpb": 2.5, "val_bpb_stderr": 0.01},
            _train(5),
            _train(10),
        ]
    )
    live.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert [line.split("  ")[0] for line in lines] == [
        f"{PROGRESS_PREFIX}1/10",
        f"{LOAD_PREFIX}max load/dead per layer: L0 1.5x/0",
        f"{PROGRESS_PREFIX}5/10",
        f"{PROGRESS_PREFIX}10/10",
        f"{LOAD_PREFIX}max load/dead per layer: L0 1.5x/0",
    ]
    assert (
        "val 2.500 bpb" in lines[3] and "MFU 1.23%" in lines[3] and "5,000 tok/s" in lines[3] and "ETA 0s" in lines[3]
    )
    assert lines[4].endswith("L1 2.2x/2")


def test_a_terminal_gets_one_block_rewritten_in_place() -> None:
    out = Terminal()
    live = LiveStatus(total=10, stream=out)
    live([_train(1), _train(2), _train(3)])
    live.close()
    text = out.getvalue()
    assert text.count("\n") == 3 + 1  # each update: status\nload (cursor up 1 before the next); a final newline
    assert text.count("\x1b[1A") == 2 and text.count(f"{PROGRESS_PREFIX}3/10") == 1


def test_a_fault_line_stays_above_the_live_block() -> None:
    out = Terminal()
    live = LiveStatus(total=10, stream=out)
    live([_train(1)])
    live.note("[shardyard] worker rank 1 died (SIGKILL); restarting from step 0")
    live([_train(2)])
    live.close()
    text = out.getvalue()
    assert "\x1b[1A\r\x1b[J[shardyard] worker rank 1 died" in text  # the block is cleared, the line printed
    assert text.index("died") < text.index(f"{PROGRESS_PREFIX}2/10")
    plain = io.StringIO()
    LiveStatus(total=10, stream=plain).note("[shardyard] a fault")
    assert plain.getvalue() == "[shardyard] a fault\n"


def test_many_layers_are_summarised() -> None:
    record = {f"moe/layer{i}/util_max": 1.0 + i / 10 for i in range(48)} | {
        f"moe/layer{i}/dead": float(i % 2) for i in range(48)
    }
    line = load_line(record)
    assert line == f"{LOAD_PREFIX}48 layers: max load 5.7x (layer 47), 24 dead experts in 24 layers"


def test_logs_follow_folds_progress_lines_on_a_terminal_only() -> None:
    log = [
        f"starting\n{PROGRESS_PREFIX}1/4  loss 3\n{LOAD_PREFIX}L0 1x/0\n",
        f"{PROGRESS_PREFIX}2/4  loss 2\n",
        "done\n",
    ]
    plain = io.StringIO()
    fold_progress(log, plain)
    assert plain.getvalue() == "".join(log)
    term = Terminal()
    fold_progress(log, term)
    shown = term.getvalue()
    assert shown.startswith("starting\n") and shown.endswith("done\n") and "\x1b[1A" in shown
