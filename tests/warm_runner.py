"""Run scripts as `python SCRIPT ARGS...` would, each in a process of its own, without paying the 4 s of importing
torch, torchvision, pandas, scikit-learn and the project's modules every time (test_docs runs 16 commands).

A server process imports those libraries and computes nothing (so no thread pool exists to be lost across a fork,
as in multiprocessing's forkserver), then reads one JSON request a line: {"script", "args", "cwd", "env", "out",
"err", "timeout"}. For each it forks a child that takes the working folder and environment, sends its stdout and
stderr to the files named, and runs the script as __main__ with the script's folder first on sys.path, as the
interpreter does; the child's exit is the interpreter's own (sys.exit, atexit handlers run). The server answers
with the child's exit status, or -9 when it ran past its timeout and was killed.

    runner = WarmRunner(); rc = runner.run(script, args, cwd, env, out, err); runner.close()
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# the libraries, and the project's modules the scripts import (loaded, never run: a script itself runs afresh
# as __main__ in each child, and imports these as it would, finding them loaded)
PRELOAD = ("numpy", "PIL.Image", "pandas", "scipy.ndimage", "scipy.stats", "torch", "torchvision", "sklearn.metrics",
           "matplotlib", "tqdm", "runtime", "fundus", "dataloader", "models", "metrics", "objectives", "evaluate")


def child(request: dict) -> None:
    """In the forked child: become `python script args` and never return to the server's loop."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = str(Path(script).parent)
    import runpy

    runpy.run_path(script, run_name="__main__")
    sys.exit(0)  # the script's end: the interpreter's exit, as after `python script`


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)  # raises SystemExit through this loop: the child ends here
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.02)
        rc = -9 if status is None else os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc}), flush=True)


class WarmRunner:
    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, script, args, cwd, env: dict, out, err, timeout: float = 300) -> int:
        request = {"script": str(script), "args": [str(a) for a in args], "cwd": str(cwd), "env": env,
                   "out": str(out), "err": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
