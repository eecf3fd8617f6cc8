"""The layout's rules (docs/ARCHITECTURE.md): which package may import which, no sys.path
manipulation, no tool importing another."""
import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "ohem_d2"
# package -> the ohem_d2 packages and modules it may import
ALLOWED = {
    "modeling": {"modeling"},
    "baselines": {"baselines", "modeling"},
    "data": {"data"},
    "engine": {"engine", "config", "arms", "data", "modeling"},
}


def imported_modules(path):
    """Absolute names of the ohem_d2 modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]  # of a module; an __init__'s module name ends in __init__
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names += [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    return [n for n in names if n == "ohem_d2" or n.startswith("ohem_d2.")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_it_may(package):
    wrong = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if len(parts) == 1 or parts[1] not in ALLOWED[package]:  # bare ohem_d2 would import it all
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, wrong


def test_nothing_touches_sys_path():
    offenders = [str(p.relative_to(REPO)) for folder in ("tools", "ohem_d2") for p in (REPO / folder).rglob("*.py")
                 if "sys.path" in p.read_text()]
    assert not offenders


def test_no_tool_imports_another_tool():
    tools = {p.stem for p in (REPO / "tools").glob("*.py")}
    wrong = []
    files = list((REPO / "tools").glob("*.py")) + list(PACKAGE.rglob("*.py")) + list((REPO / "tests").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:  # relative: the package's own module
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{path.relative_to(REPO)} imports tools/{n}.py" for n in names if n.split(".")[0] in tools]
    assert not wrong, wrong


def test_the_public_api_is_importable_from_the_package():
    import ohem_d2

    for name in ("add_ohem_config", "validate_ohem_config", "OHEMSettings", "OHEMConfigError", "OHEMMixin",
                 "MiningResult", "OHEMROIHeads", "OHEMRes5ROIHeads", "OHEMCascadeROIHeads",
                 "FastRCNNHeuristicsCascadeROIHeads", "FocalLossROIHeads", "IoUBalancedROIHeads",
                 "OHEM_SELECTION_REGISTRY", "OHEM_HARDNESS_REGISTRY", "SelectionInputs", "HardnessInputs"):
        assert hasattr(ohem_d2, name), name
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

    assert {"OHEMROIHeads", "OHEMRes5ROIHeads", "OHEMCascadeROIHeads", "FocalLossROIHeads",
            "IoUBalancedROIHeads"} <= {name for name, _ in ROI_HEADS_REGISTRY}


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, unlinked
