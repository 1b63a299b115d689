"""Training objectives: what the loop minimises. One file per objective;
:mod:`~peftcli.training.objectives.registry` names them and builds the run's (this package imports none of
them, so an objective importing ``base`` loads no other).

=======  ==============  =========  ===========================================================
name     data format     reference  loss (docs/objectives.md writes each out)
=======  ==============  =========  ===========================================================
sft      any SFT format  no         token-weighted next-token cross-entropy (the default)
dpo      preference      yes        −logσ(β·((logp_c − logref_c) − (logp_r − logref_r)))
ipo      preference      yes        ((avg_c − avgref_c) − (avg_r − avgref_r) − 1/(2β))²
kto      unpaired_pref.  yes        w·(1 − σ(±β·(logp − logref − z))), z the batch's mismatched-pair KL
simpo    preference      no         −logσ(β·(avg_c − avg_r) − γ)
orpo     preference      no         SFT on chosen − β·logσ(log-odds ratio)
reward   preference      no         −logσ(r_c − r_r), r: a seq_cls head's one output (model.task seq_cls)
grpo     prompt          kl_coef>0  clipped −ρ·Â over G sampled completions per prompt (rollout.py, rewards.py)
=======  ==============  =========  ===========================================================
"""
