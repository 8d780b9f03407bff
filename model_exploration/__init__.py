"""st-training-workflow: two-stage domain adaptation of Sentence Transformers (the INDUS-SDE-ST workflow).

Entry points: `st_trainer_ddp_hf.py` (training, one process or torchrun) and `compare.py` (checkpoint comparison);
docs/README.md ("Where the code lives") says which module holds what.
"""
