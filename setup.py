"""exo2ego-jax: JAX/Flax reimplementation of Exo2Ego (AAAI 2026) on VideoLLaMA2-7B-16F.

One setup.py serves two machines through ``python_version`` markers:
  * Python 3.11 (this dev box and CI): jax 0.10.2 is the last release for 3.11.
  * Python 3.12 (GPU machines): jax 0.11.x with the CUDA plugin.
"""
from setuptools import find_packages, setup

PY311 = 'python_version<"3.12"'
PY312 = 'python_version>="3.12"'

INSTALL_REQUIRES = [
    f"jax==0.10.2; {PY311}",
    f"jax>=0.11.2,<0.13; {PY312}",
    f"flax==0.12.8; {PY311}",
    f"flax>=0.12.8,<0.13; {PY312}",
    "optax>=0.2.8,<0.3",
    f"orbax-checkpoint==0.12.8; {PY311}",
    f"orbax-checkpoint>=0.12.4,<0.13; {PY312}",
    "chex>=0.1.92",
    "numpy>=2,<3",
    "ml-collections==1.1.0",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "protobuf>=6.33.5,<8",
    "transformers>=5.17.0,<6",
    "jinja2",               # transformers' apply_chat_template (exports carry the chat template)
    "safetensors>=0.8",
    "tokenizers>=0.23.1,<0.24",
    "av==18.1.0",
    "pillow",               # CLIP preprocessing (bicubic resize, as CLIPImageProcessor)
    "importlib_resources",  # TFDS builders defined in code import it
    "matplotlib",           # the demo's loss-curve plots
    "tqdm",
    "tensorboardX>=2.6",    # TensorBoard event files without TensorFlow
    "scikit-learn>=1.5",  # average precision for the benchmark metrics
]

EXTRAS = {
    # PyTorch references for the parity tests. Pinned exactly: on Python 3.11 these three
    # wheels lie on the build machines' disk; any other torch spec pulls a multi-GB build.
    "test": [
        "pytest>=8",
        "pytest-xdist",             # the suite runs on both cores (`-n 2`)
        "psutil",
        "ruff",                     # the linter configuration in ruff.toml is a test
        "tensorboard",              # TensorBoard's own reader checks the event files
        # Python 3.12 has no CPU-usable torch wheel here: the tests that use these references are skipped there
        # (counted; tests/conftest.py), the rest run.
        f"torch==2.14.1; {PY311}",
        f"torchvision==0.29.1; {PY311}",
        f"timm==1.0.3; {PY311}",
        f"peft>=0.17; {PY311}",
        "rouge-score",              # ROUGE-L reference for the QAEgo4D-open metric
        "nbclient", "nbformat", "ipykernel",  # the notebooks run in the test suite
    ],
    # XLA's CUDA compiler (ptxas, cuDNN, the CUDA plugin) matching the pinned jax: compiles for H100/H200
    # topologies on a machine without a GPU (launch/aot_compile.py), with JAX_PLATFORMS=cpu.
    "aot": [f"jax[cuda12]==0.10.2; {PY311}", f"jax[cuda12]>=0.11.2,<0.12; {PY312}"],
    # A GPU host: the same wheels bring the CUDA runtime, cuDNN and NCCL the training steps run on.
    "gpu": [f"jax[cuda12]==0.10.2; {PY311}", f"jax[cuda12]>=0.11.2,<0.12; {PY312}"],
    # Cloud TPU: libtpu matching the pinned jax (jax's own `tpu` extra pins it). On a TPU VM it runs the stages;
    # on any machine it compiles for TPU slices without a TPU (launch/aot_compile.py --target v5p-64). It
    # installs beside the `aot` extra (both compilers were loaded in one process and compiled there), but a
    # GPU or TPU host needs only its own.
    "tpu": [f"jax[tpu]==0.10.2; {PY311}", f"jax[tpu]>=0.11.2,<0.13; {PY312}"],
    # XProf/TensorBoard profile plugin drags in many cloud dependencies: opt-in only.
    "profile": ["xprof>=2.24", "tensorboard"],
}

setup(
    name="exo2ego_jax",
    version="0.1.0",
    description="Exo2Ego: exocentric-knowledge-guided MLLM for egocentric video, in JAX/Flax",
    packages=find_packages(include=["exo2ego_jax", "exo2ego_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    include_package_data=True,
    package_data={"exo2ego_jax.data.resources": ["*.json"]},
)
