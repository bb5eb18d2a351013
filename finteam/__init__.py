"""finteam: the FinTeamExperts pipeline. A team of role experts (macro, micro and quantitative
analysts), each continued-pretrained from one base model, is merged into a Mixture-of-Experts
(Branch-Train-MiX), instruction-tuned on financial tasks and evaluated against dense baselines.

Stages (one module each; `finteam <stage>` runs one, `finteam run` runs all):
    data -> tokenizer -> pretrain -> assemble -> mix -> instruct -> evaluate, and generate.
Recipes (YAML, typed by the dataclasses in `finteam.config`): tiny (default), tiny-long, smoke, fiqa,
llama3-8b.
"""
import importlib.util

__version__ = "0.1.0"

# The kernels install alone (`pip install .`); the pipeline needs the `pipeline` extra.
_NEEDS = {"yaml": "pyyaml", "datasets": "datasets", "tokenizers": "tokenizers", "safetensors": "safetensors",
          "transformers": "transformers", "tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}
_missing = [package for module, package in _NEEDS.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(f"the finteam pipeline needs {', '.join(_missing)}, which are not installed: "
                      "pip install --no-build-isolation '.[pipeline]' (or 'finteam[pipeline]')")
