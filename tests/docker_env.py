"""A private Docker engine on a machine where none runs, and what a build of the judging image needs there.

On this project's machines (see ../shared/DESIGN.md, "Docker") no engine runs, base images cannot be pulled
and TLS is intercepted. This helper:

- starts Debian's ``dockerd`` (package docker.io) with its own data root, exec root, pid file and unix
  socket, without iptables or a bridge, and stops it again by its pid (then unmounts what it left mounted);
- makes a stand-in for the Dockerfile's default base image (``python:3.11-slim-bookworm``): a minbase Debian
  bookworm + python3 + venv from ``mmdebstrap`` (or, slower, ``debootstrap --variant=minbase``),
  ``docker import``-ed under that name; the root file system is cached as a tar under ~/.cache;
- fills a wheels folder for an offline build (``PIP_NO_INDEX=1``) with the host's pip, which knows the local
  wheel folders and the CA bundle: a CPU build of torch from a local wheel (PyPI's Linux torch is a CUDA
  build of several GB) and the inference requirements. When the only torchvision to be had is a CUDA build
  (PyPI's), a CPU-usable copy of it is made: its compiled ops (nms, roi_align, ... which need libtorch_cuda)
  are left out and the two fake-kernel registrations that torchvision makes even without them are guarded.
  timm needs only torchvision's Python parts (transforms, FrozenBatchNorm2d).

Command line (as root):
    python tests/docker_env.py start [--root DIR]      # prints the DOCKER_HOST to export
    python tests/docker_env.py base                    # the stand-in base image in that engine
    python tests/docker_env.py wheels DIR              # the offline wheels (a CPU torch) into DIR
    python tests/docker_env.py build [-t TAG]          # all of the above, then builds the repo's image
    python tests/docker_env.py stop [--root DIR]
Tests use it as a module: ``with Engine() as engine: ...``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import fcntl
import functools
import glob
import hashlib
import http.server
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kaggle-pipeline" / "docker"
DEFAULT_ROOT = Path("/tmp/kaggle-dockerd")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Where these machines keep the CPU build of torch (pip's find-links, see `pip config list`).
CPU_TORCH_GLOB = "/opt/wheels/torch-*+cpu-cp311-cp311-*linux*_x86_64.whl"
INSTALL_HINT = "apt-get install -y docker.io mmdebstrap"


class EngineUnavailable(RuntimeError):
    """No Docker engine can be started here; the message says why."""


class EngineBusy(EngineUnavailable):
    """Another engine holds this data root (a concurrent run): another data root would do."""


class ToolsMissing(RuntimeError):
    """A program this needs is not installed (but could be: INSTALL_HINT)."""


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def dockerfile_base(dockerfile: Path = ROOT / "Dockerfile") -> str:
    """The default of the Dockerfile's ``ARG BASE=...``."""
    m = re.search(r"^ARG BASE=(\S+)", dockerfile.read_text(), re.M)
    if not m:
        raise ValueError(f"{dockerfile}: no 'ARG BASE=<image>' line")
    return m.group(1)


def dockerfile_arg(name: str, dockerfile: Path = ROOT / "Dockerfile") -> str | None:
    m = re.search(rf"^ARG {re.escape(name)}=(\S+)", dockerfile.read_text(), re.M)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------- the engine
def missing_tools() -> list[str]:
    return [t for t in ("dockerd", "containerd", "runc", "docker") if shutil.which(t) is None]


def _mounts_under(paths: Iterable[Path]) -> list[str]:
    roots = [str(p) for p in paths]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == r or point.startswith(r + "/") for r in roots):
                found.append(point)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child of ours counts as gone
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.2)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Engine:
    """A private dockerd: ``with Engine() as e: e.docker("build", ...)``; stopped (by its pid) on exit.

    ``root`` holds its runtime state (exec root, pid file, socket, log; a fresh /tmp folder by default, removed
    at stop). ``data_root`` (images, layers, build cache) defaults to ``root/data``, removed with it; a given
    one is kept for the next start, which makes rebuilds fast, and locked while this engine runs."""

    def __init__(self, root: Path | None = None, data_root: Path | None = None, keep: bool = False):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="dockerd-", dir="/tmp"))
        self.keep = keep  # keep root (and so a data root inside it) after stop
        self.data_root = Path(data_root) if data_root else self.root / "data"
        self.exec_root = self.root / "exec"  # short: containerd's socket paths must stay under 108 bytes
        self.pidfile = self.root / "dockerd.pid"
        self.socket = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.proc: subprocess.Popen | None = None
        self._lock = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "BUILDKIT_"))}
        # No buildx plugin here: the client uses the classic builder (Debian's daemon, 20.10, serves it).
        return env | {"DOCKER_HOST": self.host, "DOCKER_CONFIG": str(self.root / "client")}

    def start(self, timeout: float = 60.0) -> Engine:
        problem = None
        if os.geteuid() != 0:
            problem = EngineUnavailable("starting dockerd needs root (this process is not root)")
        elif missing := missing_tools():
            problem = ToolsMissing(f"{', '.join(missing)} not installed ({INSTALL_HINT})")
        elif len(str(self.exec_root)) > 60:
            problem = EngineUnavailable(f"engine root {self.root} too long for containerd's socket paths")
        if problem:
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)
            raise problem
        for d in (self.data_root, self.exec_root, self.root / "client"):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_root / ".engine.lock", "w")  # noqa: SIM115 (held until stop)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)
            raise EngineBusy(f"another engine uses {self.data_root}") from None
        self._stop_stale()
        cmd = [
            "dockerd", "--data-root", self.data_root, "--exec-root", self.exec_root,
            "--pidfile", self.pidfile, "-H", self.host, "--iptables=false", "--ip6tables=false",
            "--bridge=none",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        (self.data_root / ".engine.pid").write_text(f"{self.proc.pid} {self.root}\n")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                reason = f"dockerd exited with {self.proc.returncode}: {self.log_tail()}"
                self.stop()
                raise EngineUnavailable(reason)
            if self.socket.exists():
                r = _run(["docker", "version", "--format", "{{.Server.Version}}"], check=False,
                         capture_output=True, text=True, env=self.env)  # fmt: skip
                if r.returncode == 0:
                    return self
            time.sleep(0.25)
        reason = f"dockerd did not answer within {timeout:.0f} s: {self.log_tail()}"
        self.stop()
        raise EngineUnavailable(reason)

    def _stop_stale(self) -> None:
        """A dockerd left running on this data root by an earlier run that was killed (the lock is free, the
        process is not): stop it by its recorded pid before a second daemon opens the same files."""
        record = self.data_root / ".engine.pid"
        with contextlib.suppress(OSError, ValueError):
            pid_text, old_root = record.read_text().split(maxsplit=1)
            pid, old_root = int(pid_text), Path(old_root.strip())
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if Path(cmdline[0].decode()).name == "dockerd" and str(self.data_root).encode() in cmdline:
                    _stop_pid(pid)
            for point in sorted(_mounts_under([self.data_root, old_root]), key=len, reverse=True):
                _run(["umount", "-l", point], check=False, capture_output=True)
            if old_root != self.root and old_root.name.startswith("dockerd-"):
                shutil.rmtree(old_root, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def docker(self, *args, check: bool = True, capture: bool = False, **kw) -> subprocess.CompletedProcess:
        if capture:
            kw |= {"capture_output": True, "text": True}
        return _run(["docker", *args], check=check, env=self.env, **kw)

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, capture=True).returncode == 0

    def stop(self) -> None:
        """Stop dockerd by its pid (its containers and its containerd go with it), then unmount what it left
        mounted (network namespaces, overlays) and remove the runtime folder."""
        pid = self.proc.pid if self.proc else None
        if pid is None and self.pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                pid = int(self.pidfile.read_text().strip())
        cpid = None  # dockerd's own containerd, should dockerd die without stopping it
        with contextlib.suppress(OSError, ValueError):
            cpid = int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        if pid:
            _stop_pid(pid)
            if self.proc:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            if cpid and _pid_alive(cpid) and "containerd" in Path(f"/proc/{cpid}/comm").read_text():
                _stop_pid(cpid, timeout=10)
        for point in sorted(_mounts_under([self.root, self.data_root]), key=len, reverse=True):
            _run(["umount", "-l", point], check=False, capture_output=True)
        self.proc = None
        if self._lock:
            self._lock.close()
            self._lock = None
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ the base image
def base_tarball(cache: Path = CACHE, log=None) -> Path:
    """The stand-in base's root file system as a tar, made once (mmdebstrap: ~40 s; debootstrap: ~3 min)."""
    key = hashlib.sha256(" ".join(("bookworm", DEBIAN_MIRROR, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    tar = cache / f"bookworm-minbase-python3-{key}.tar"
    if tar.exists():
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    part = cache / f".{tar.stem}.{os.getpid()}.tar"  # mmdebstrap writes a tar for a name ending in .tar
    out = {"stdout": log or subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    include = f"--include={','.join(BASE_PACKAGES)}"
    try:
        if shutil.which("mmdebstrap"):
            # Like the official python image: `python` is Python 3.11; mmdebstrap drops apt's caches itself.
            _run(["mmdebstrap", "--variant=minbase", include,
                  '--customize-hook=ln -s /usr/bin/python3 "$1/usr/local/bin/python"', "bookworm", part,
                  DEBIAN_MIRROR], **out)  # fmt: skip
        elif shutil.which("debootstrap"):
            with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache) as tmp:
                rootfs = Path(tmp) / "rootfs"
                _run(["debootstrap", "--variant=minbase", include, "bookworm", rootfs, DEBIAN_MIRROR], **out)
                (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
                for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log", "tmp"):
                    for p in (rootfs / junk).glob("*"):
                        if p.is_file() or p.is_symlink():
                            p.unlink()
                        elif p.is_dir() and p.name != "partial":
                            shutil.rmtree(p)
                _run(["tar", "--numeric-owner", "-C", rootfs, "-cf", part, "."])
        else:
            raise ToolsMissing(f"neither mmdebstrap nor debootstrap is installed ({INSTALL_HINT})")
        part.rename(tar)
    finally:
        part.unlink(missing_ok=True)
    return tar


def ensure_base_image(engine: Engine, tag: str | None = None, cache: Path = CACHE, log=None) -> str:
    """Tag ``tag`` (the Dockerfile's default BASE) in ``engine``: an imported minbase root file system."""
    tag = tag or dockerfile_base()
    if engine.has_image(tag):
        return tag
    tar = base_tarball(cache, log=log)
    changes = ["ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
               'CMD ["python3"]']  # fmt: skip
    args = ["import"]
    for c in changes:
        args += ["--change", c]
    engine.docker(*args, tar, tag, capture=True)
    return tag


# ------------------------------------------------------------------------------------------------- wheels
def vision_for(torch_version: str) -> str:
    """torchvision's release for a torch 2.x release (2.13 -> 0.28, 2.14 -> 0.29)."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if major != 2:
        raise ValueError(f"no torchvision mapping for torch {torch_version}")
    return f"0.{minor + 15}.0"


def local_cpu_torch() -> Path | None:
    found = sorted(glob.glob(os.environ.get("CPU_TORCH_WHEEL", CPU_TORCH_GLOB)))
    return Path(found[-1]) if found else None


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def cpu_usable_torchvision(wheel: Path, dest_dir: Path) -> Path:
    """A copy of a CUDA torchvision wheel usable with a CPU torch: no compiled ops, guarded fake kernels.

    Upstream registers fake kernels for torchvision::nms/qnms even when its ops failed to load, so
    ``import torchvision`` fails ("operator torchvision::nms does not exist") with a CPU torch. The copy is
    versioned ``X+cpunoops`` (satisfies ``torchvision==X``) and drops every shared library."""
    m = re.match(r"torchvision-([^-]+?)(?:\+[^-]*)?-(.+)\.whl$", wheel.name)
    if not m:
        raise ValueError(f"not a torchvision wheel: {wheel}")
    version, tags = m.group(1), m.group(2)
    new_version = f"{version}+cpunoops"
    out = dest_dir / f"torchvision-{new_version}-{tags}.whl"
    guard = "if torchvision.extension._has_ops() else (lambda f: f))"
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        old_info = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD")).rsplit("/", 2)[0]
        new_info = f"torchvision-{new_version}.dist-info"
        records = []
        for item in zin.infolist():
            name = item.filename
            if name.endswith(".dist-info/RECORD"):
                continue
            if name.startswith("torchvision.libs/") or re.search(r"\.so(\.|$)", name):
                continue
            data = zin.read(item)
            if name == "torchvision/_meta_registrations.py":
                text, n = re.subn(r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$',
                                  rf"@(torch.library.register_fake(\1) {guard}", data.decode(), flags=re.M)  # fmt: skip
                if n == 0 and guard not in text:
                    raise ValueError(f"{wheel.name}: torchvision's fake nms registration not found")
                data = text.encode()
            if name.startswith(old_info + "/"):
                name = new_info + name[len(old_info) :]
                if name.endswith("/METADATA"):
                    data = re.sub(rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1,
                                  flags=re.M)  # fmt: skip
            zout.writestr(name, data)
            records.append(_record_line(name, data))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*records, [f"{new_info}/RECORD", "", ""]])
        zout.writestr(f"{new_info}/RECORD", buf.getvalue())
    return out


def _pip_download(dest: Path, args: Sequence[str], log=None) -> None:
    # The host's pip picks wheels for the host's interpreter: it must match the image's (pip's --platform
    # and --python-version flags are no substitute here: with them pip rejects the local +cpu torch wheel).
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux" or os.uname().machine != "x86_64":
        raise RuntimeError(
            "the offline wheels are fetched with this Python, which must be 3.11 on x86_64 Linux"
        )
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
          "-d", dest, *args], stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip


def prefetch_wheels(dest: Path, requirements: Path = ROOT / "requirements-predict.txt",
                    torch_wheel: Path | None = None, cache: Path = CACHE, log=None) -> dict[str, str]:  # fmt: skip
    """Fill ``dest`` with every wheel an offline build needs, a CPU torch among them.

    Returns the build args for it (TORCH_VERSION, TORCHVISION_VERSION, PIP_NO_INDEX). Downloads are kept in
    a cache folder keyed by the requirements, so a second call copies files only."""
    torch_wheel = torch_wheel or local_cpu_torch()
    if torch_wheel is None:
        raise FileNotFoundError(f"no CPU torch wheel ({CPU_TORCH_GLOB}; set CPU_TORCH_WHEEL to one)")
    torch_version = torch_wheel.name.split("-")[1]  # e.g. 2.13.0+cpu
    vision = vision_for(torch_version)
    key = hashlib.sha256(requirements.read_bytes() + torch_wheel.name.encode()).hexdigest()[:12]
    store = cache / f"wheels-{key}"
    done = store / ".complete"
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as lock:  # one filler at a time; the others then find it complete
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _pip_download(store, ["--find-links", torch_wheel.parent, f"torch=={torch_version}",
                                  f"torchvision=={vision}", "-r", requirements], log=log)  # fmt: skip
            visions = [p for p in store.glob("torchvision-*.whl") if "+cpunoops" not in p.name]
            for p in visions:
                if "+cpu" not in p.name:  # a CUDA build: make the CPU-usable copy, drop the original
                    cpu_usable_torchvision(p, store)
                    p.unlink()
            done.touch()
    dest.mkdir(parents=True, exist_ok=True)
    for p in store.glob("*.whl"):
        target = dest / p.name
        if not target.exists():
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
    return {"TORCH_VERSION": torch_version.split("+")[0], "TORCHVISION_VERSION": vision, "PIP_NO_INDEX": "1"}


# -------------------------------------------------------------------------------------------------- build
def make_context(dest: Path, bundle: Path) -> Path:
    """A build context with just what the Dockerfile copies: src/, the requirements and the bundle (at
    output/bundle), so that a build needs neither the repository's output/ nor a large context."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Dockerfile", ".dockerignore", "requirements-predict.txt"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(bundle, dest / "output" / "bundle")
    return dest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


WHEELS_PORT = (
    38517  # fixed where free: the URL is a build argument, and a new value would miss the layer cache
)


@contextlib.contextmanager
def serve_folder(folder: Path, port: int = WHEELS_PORT) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (``port``, else any free one) for the duration; yields its URL. pip takes
    the listing as find-links; plain HTTP on the loopback is a secure origin to it (no TLS: no CA needed)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build(engine: Engine, context: Path, tag: str, wheels: Path | None = None,
          build_args: dict[str, str] | None = None, log=None, timeout: float | None = None) -> None:  # fmt: skip
    """``docker build`` of ``context`` with ``--network host``. With ``wheels`` (a folder), it is filled by
    ``prefetch_wheels`` and served to pip on the loopback: an offline build with a CPU torch; the wheels never
    enter the context or a layer. Without, pip reaches the indexes itself (PyPI and PyTorch's)."""
    with contextlib.ExitStack() as stack:
        args = dict(build_args or {})
        if wheels is not None:
            args = prefetch_wheels(wheels, log=log) | args
            args["PIP_FIND_LINKS"] = stack.enter_context(serve_folder(wheels))
        cmd = ["build", "--network", "host", "-t", tag]
        for k, v in args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        engine.docker(*cmd, context, stdout=log, stderr=subprocess.STDOUT if log else None, timeout=timeout)


# ---------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=["start", "stop", "base", "wheels", "build"])
    ap.add_argument("dir", nargs="?", type=Path, help="wheels: the folder to fill")
    ap.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="the engine's run-time folder (%(default)s)"
    )
    ap.add_argument(
        "--data-root", type=Path, default=CACHE / "cli-engine-data", help="its images, kept (%(default)s)"
    )
    ap.add_argument("-t", "--tag", default="kaggle-predict", help="build: the image's tag")
    ap.add_argument("--bundle", type=Path, default=ROOT / "output" / "bundle", help="build: the bundle")
    a = ap.parse_args(argv)
    engine = Engine(a.root, data_root=a.data_root, keep=True)

    def running() -> bool:
        if a.root.joinpath("docker.sock").exists():
            return engine.docker("version", check=False, capture=True).returncode == 0
        return False

    try:
        if a.command in ("start", "base", "build") and not running():
            engine.start()  # left running: `stop` ends it
        if a.command == "start":
            print(f"export DOCKER_HOST={engine.host}")
        elif a.command == "stop":
            engine.keep = False  # the run-time folder; the data root stays
            engine.stop()
        elif a.command == "base":
            print(ensure_base_image(engine, log=sys.stderr))
        elif a.command == "wheels":
            if a.dir is None:
                ap.error("wheels needs the folder to fill")
            print(prefetch_wheels(a.dir, log=sys.stderr))
        elif a.command == "build":
            ensure_base_image(engine, log=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="context-") as tmp:
                context = make_context(Path(tmp) / "context", a.bundle)
                build(engine, context, a.tag, wheels=Path(tmp) / "wheels", log=sys.stderr)
            print(f"built {a.tag}: export DOCKER_HOST={engine.host}")
    except (EngineUnavailable, ToolsMissing, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"docker_env.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
