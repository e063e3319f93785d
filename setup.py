from setuptools import find_packages, setup

setup(
    name="sdlab",
    version="0.1.0",
    description="SD Kernel Lab: fused Triton kernels inside a from-scratch Stable Diffusion, switchable per op",
    packages=find_packages(include=["kernels", "kernels.*", "sdcore", "sdcore.*", "pipelines",
                                    "pipelines.*", "bench", "bench.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # autograd.graph.increment_version of a list of tensors (scheduler_step's out=)
        "triton>=3.0; platform_system == 'Linux'",  # elsewhere kernels imports and runs the references
        "numpy",
        "safetensors",
        "tokenizers>=0.15",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # Test-time oracles (models built from configs, nothing downloaded) and the bench tooling.
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.30", "transformers>=5", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
)
