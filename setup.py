"""ohem_d2: Online Hard Example Mining for Detectron2.

Detectron2 itself is not on PyPI: run ``make install`` (or
``python scripts/install_detectron2.py``) first, which keeps a Detectron2 you
already have and otherwise installs its pure-Python code.
"""
from setuptools import find_packages, setup

setup(
    name="ohem_d2",
    version="0.1.0",
    description="Online Hard Example Mining (Shrivastava et al., CVPR 2016) for Detectron2",
    packages=find_packages(include=["ohem_d2", "ohem_d2.*"]),
    # The configs ship in the package (ohem_d2/model_zoo/configs links to configs/), so that an
    # installed ohem_d2 finds them: ohem_d2.model_zoo.get_config_file(...).
    package_data={"ohem_d2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.8",
    install_requires=[
        "detectron2",
        # The oldest versions ohem_d2 runs on (ohem_d2/requirements.py; make test-oldest-torch).
        "torch>=2.4",
        "torchvision>=0.19",
        "fvcore>=0.1.5,<0.1.6",
        "pycocotools>=2.0.2",
        # Headless build: the desktop wheel needs libGL, absent on servers and CI.
        "opencv-python-headless>=4.5",
        "matplotlib>=3.5",
        "numpy",
    ],
    # submitit: the SLURM launcher of tools/run_experiment.py (--launcher slurm), imported by it alone.
    extras_require={"slurm": ["submitit>=1.5"], "test": ["pytest>=7.3", "submitit>=1.5"]},
)
