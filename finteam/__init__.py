"""finteam: the FinTeamExperts pipeline. A team of role experts (macro, micro and quantitative
analysts), each continued-pretrained from one base model, is merged into a Mixture-of-Experts
(Branch-Train-MiX), instruction-tuned on financial tasks and evaluated against dense baselines.

Stages (one module each; `finteam <stage>` runs one, `finteam run` runs all):
    data -> tokenizer -> pretrain -> assemble -> instruct -> evaluate, and generate.
Recipes (YAML, typed by the dataclasses in `finteam.config`): tiny (default), smoke, llama3-8b.
"""
__version__ = "0.1.0"
