import re
from pathlib import Path

from setuptools import setup

# The version is written once, as alip_hf.__version__; read as text, so that building needs none of its imports.
VERSION = re.search(r'^__version__ = "([^"]+)"$', Path(__file__).with_name("alip_hf").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

# Everything the code reads at run time ships inside the package, so a wheel installed anywhere works:
# the model-card template (alip_hf/model_card.md is a link to the repository's model_card.md), the demo data,
# the run configs and the `evaluate` modules.
PACKAGE_DATA = [
    "model_card.md",
    "demo_data/*",
    "configs/*.yaml",
    "configs/accelerate/*.yaml",
    "evaluate_modules/*/*.py",
]

setup(
    name="alip-hf",
    version=VERSION,
    description="Train CLIP models on noisy web data with synthetic captions (ALIP, VeCLIP, CLIP) on the Hugging Face stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Only the project's own top-level names: the library, the Hub remote-code model, the caption producers.
    packages=["alip_hf", "alip_hf.convert", "alip_hf.evaluation", "alip_hf.training", "modeling_alip", "recaption"],
    package_data={"alip_hf": PACKAGE_DATA},
    entry_points={
        "console_scripts": [
            "alip-train = alip_hf.train:cli",
            "alip-eval = alip_hf.eval:cli",
            "alip-convert = alip_hf.convert.cli:cli",
        ]
    },
    install_requires=[
        # Tested with torch 2.14.1 / torchvision 0.29.1.
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.4",  # resumable IterableDataset state (state_dict / load_state_dict), shard / reshard
        "torchdata>=0.8",  # StatefulDataLoader: a streaming run's position is saved with its checkpoints
        "peft>=0.13",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors",
        "pillow",
        "pyyaml",
        "tqdm",
        "scikit-learn",
        "ftfy",  # the text cleaning CLIP's tokenizer was trained with
        "open_clip_torch>=2.24",  # ships the real CLIP BPE vocabulary, read offline by clip_tokenizer()
    ],
    extras_require={
        "dev": [
            "pytest",
            "clip-benchmark",  # reference metrics for eval.py's parity tests
            "webdataset",
            "sentencepiece",
            "tensorboard",
            "matplotlib",
            "ray[data]",  # recaption --engine ray (tests on a local cluster)
            "psutil",  # the Ray tests find a replica's process to kill it
            "parameterized",  # transformers' own test mixins (tests/test_transformers_contract.py) use it
        ],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],  # eval.py --plot: recall@k curves
        "vllm": ["vllm"],  # recaption.caption / recaption.rewrite --backend vllm
        "ray": ["ray[data]"],  # recaption --engine ray
        # alip_hf.web: URL + text tables -> WebDataset shards. img2dataset pins pandas<3 and webdataset<0.3;
        # where those clash, install it in its own environment and pass --img2dataset (docs/web_data.md).
        "web": ["img2dataset>=1.45"],
    },
)
