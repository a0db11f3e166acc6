"""A fork server for the tests' `aicsd` commands: it imports what every command imports (torch, torchvision, matplotlib:
about 5 s of a tiny run's 6 on a 2-core CI machine), once, then forks a fresh process for each command.

Each command still runs in a process of its own, as the console script runs it: its own pid and process group, the
test's folder and environment, stdin from /dev/null, stdout and stderr to files, `aicsd.entry.console_main` with
`sys.argv` as the shell sets it, and the interpreter's normal exit (atexit handlers, buffers flushed, an uncaught
exception printed with exit status 1). Only the imports are shared: they ran before the fork, in this process, with
the tests' environment (tests/conftest.py starts it with `ENV`). The multiprocessing module's forkserver is not
used: its children run a multiprocessing bootstrap and leave through `os._exit` (no atexit handlers), which the
console script's process does not.

Protocol, one JSON line per command on stdin: {"argv": [...], "cwd": ..., "env": {...}, "stdout": FILE, "stderr": FILE};
this process answers two lines: the command's pid as soon as it is forked, then its exit status (negative: the signal).
`conftest.run` sends the commands; AICSD_TEST_FORK=0 in the environment makes it start real processes instead."""
import json, os, sys, tempfile


def _command(req:dict):
    "In the forked child: become the command's process, run it, and leave through the interpreter's exit."
    os.setsid()                                                    # a process group of its own: a timeout kills it whole
    os.chdir(req['cwd'])
    os.environ.clear(); os.environ.update(req['env'])
    tempfile.tempdir = None                                        # gettempdir() reads this command's TMPDIR
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    for fd, path in ((1, req['stdout']), (2, req['stderr'])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.dup2(f, fd); os.close(f)
    sys.argv = list(req['argv'])
    sys.path[0] = os.path.dirname(sys.argv[0])                     # as for the script: its folder, not tests/
    from aicsd.entry import console_main
    sys.exit(console_main())                                       # what the console script does


def serve():
    import aicsd.cli, aicsd.entry, aicsd.viz                       # noqa: F401  the imports the commands share
    requests = os.fdopen(os.dup(0), 'rb', buffering=0)             # the protocol on fds of their own; 0 and 1 are the
    answers = os.fdopen(os.dup(1), 'wb', buffering=0)              # commands' (stdin from /dev/null, stdout to a file)
    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 0); os.dup2(null, 1); os.close(null)
    while line := requests.readline():
        req = json.loads(line)
        pid = os.fork()
        if pid == 0: _command(req)                                 # raises SystemExit (or the command's error): never returns
        answers.write(f'{pid}\n'.encode())
        _, status = os.waitpid(pid, 0)
        answers.write(f'{os.waitstatus_to_exitcode(status)}\n'.encode())


if __name__ == '__main__':
    serve()
