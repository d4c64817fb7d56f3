"""What a fine-tuning run tells its user: a progress bar on a terminal, a log line every few steps
elsewhere, one line for a resume and its changed settings; and Ctrl-C taking effect between steps,
so a checkpoint always holds exactly the step it names."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from tqdm import tqdm

from ktjax.io.load import show_progress


class Reporter:
    """A tqdm bar when stderr is a terminal (or progress=True), else a line every `every` steps
    (none with progress=False); notes (`say`) always. Nothing at all with speaks=False (the
    processes of a multi-host run other than process 0, which speaks for the run)."""

    def __init__(self, steps: int, start: int, progress: bool | None, every: int = 10, speaks: bool = True):
        self.steps, self.every, self.speaks = steps, every, speaks
        self.bar_on = show_progress(progress) and speaks
        self.quiet = progress is False
        self.bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not self.bar_on,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def start_at(self, step: int) -> None:
        self.bar.n = step
        self.bar.refresh()

    def say(self, line: str) -> None:
        if not self.speaks:
            return
        if self.bar_on:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self, rec: dict) -> None:
        post = f"loss={rec['loss']:.4f}, {_fmt_rate(rec['tokens_per_s'])} tok/s"
        if "eval_loss" in rec:
            post += f", eval={rec['eval_loss']:.4f}"
        if self.bar_on:
            self.bar.set_postfix_str(post, refresh=False)
            self.bar.update(1)
        elif self.speaks and not self.quiet and (rec["step"] % self.every == 0 or rec["step"] == self.steps or "eval_loss" in rec):
            self.say(f"finetune: step {rec['step']}/{self.steps}, {post}")

    def close(self) -> None:
        self.bar.close()


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


class StepBoundary:
    """Ctrl-C (SIGINT) during a step (or a checkpoint being written) takes effect when the step
    is done and its state committed (the checkpoint complete); a second Ctrl-C stops at once,
    and the step is then lost, not saved half done. Outside the main thread (no signal handlers
    there) interrupts are not deferred."""

    def __init__(self, say):
        self.say = say
        self.pending = False

    def _handler(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        self.say("finetune: interrupted; finishing the current step to save it (Ctrl-C again to stop now, "
                 "without saving it)")

    @contextlib.contextmanager
    def deferred(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.pending:
            raise KeyboardInterrupt
