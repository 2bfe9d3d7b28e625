"""The project's own invariants: settings.ini agrees with pyproject.toml, environment.yml names this package,
notebooks are laid out as nbdev and papermill expect."""
import configparser, json, shutil, subprocess, sys, tomllib
from pathlib import Path

import yaml

import lagm_nb

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _settings():
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(ROOT / "settings.ini")
    return cp["DEFAULT"]


def _bool(v):
    return str(v).lower() in ("true", "1", "yes")


def test_settings_ini_agrees_with_pyproject():
    pp, st = _pyproject(), _settings()
    proj, nb = pp["project"], pp["tool"]["nbdev"]
    assert st["lib_name"] == proj["name"]
    assert st["version"] == lagm_nb.__version__
    assert st["min_python"] == proj["requires-python"].lstrip(">=")
    assert st["description"] == proj["description"]
    assert st["keywords"].split() == proj["keywords"]
    assert st["author"] == proj["authors"][0]["name"] and st["author_email"] == proj["authors"][0]["email"]
    assert st["requirements"].split() == proj["dependencies"]
    assert st["dev_requirements"].split() == proj["optional-dependencies"]["dev"]
    for key, value in nb.items():   # every nbdev setting of pyproject.toml must be in settings.ini with the same value
        assert key in st, f"settings.ini lacks {key}"
        if isinstance(value, bool): assert _bool(st[key]) == value, key
        elif isinstance(value, list): assert st[key].split() == value, key
        elif isinstance(value, int): assert int(st[key]) == value, key
        else: assert st[key] == value, key


def test_environment_yml_installs_this_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert env["name"] == _pyproject()["project"]["name"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[dev]" in pip


def _library_notebooks():
    "(notebook path relative to nbs/, module name) of every library notebook, the bench ones included."
    for path in sorted((ROOT / "nbs").glob("**/[0-9][0-9]_*.ipynb")):
        src = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        yield path.relative_to(ROOT / "nbs").with_suffix("").as_posix(), next(
            l for l in src.splitlines() if l.startswith("#| default_exp")).split()[-1]


def test_library_notebooks_export_existing_modules():
    nbs = list(_library_notebooks())
    assert len(nbs) >= 19
    for notebook, module in nbs:
        path = ROOT / "lagm_nb" / (module.replace(".", "/") + ".py")
        assert path.exists(), f"{notebook} exports {module}, not found in lagm_nb/"
        assert Path(notebook).name.split("_", 1)[1] == module.split(".")[-1], f"{notebook} is not named after {module}"


def test_readme_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    for notebook, module in _library_notebooks():
        assert f"| `{notebook}` | `lagm_nb.{module}` |" in readme, f"README's module table lacks {notebook} / {module}"


def test_experiment_notebooks_have_papermill_parameters():
    exps = sorted((ROOT / "nbs" / "experiments").glob("*.ipynb"))
    assert exps, "no experiment notebooks"
    assert (ROOT / "nbs" / "experiments" / ".notest").exists(), "nbdev-test must skip experiments (papermill runs them)"
    for path in exps:
        cells = json.loads(path.read_text())["cells"]
        params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        src = "".join(params[0]["source"])
        assert "profile" in src and "out_dir" in src, f"{path.name}: parameters need `profile` and `out_dir`"


def test_package_passes_ruff():
    """pyflakes and the 120-character line limit on lagm_nb/ (the rules are in pyproject.toml). nbdev writes each
    module's `__all__` itself and lets its first line run to 130 characters; those lines alone are exempt."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[dev]'"
    out = subprocess.run([ruff, "check", "lagm_nb", "--output-format", "json", "--exit-zero"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    def line(e): return Path(e["filename"]).read_text().splitlines()[e["location"]["row"] - 1]
    errors = [e for e in json.loads(out) if not (e["code"] == "E501" and line(e).startswith("__all__ = ["))]
    assert not errors, "\n".join(f"{e['filename']}:{e['location']['row']}: {e['code']} {e['message']}" for e in errors)
