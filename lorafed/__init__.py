"""lorafed: federated LoRA fine-tuning of frozen 8-bit BERT classifiers.

The modules follow the data flow: ``data`` -> ``partition`` -> ``model`` -> ``train`` ->
``adapter`` -> ``payload`` -> ``validate`` -> ``aggregate`` (via ``server``) -> ``evaluate``;
``simulate`` runs it all in one process and ``cli`` is the command line.
"""

__version__ = "0.1.0"
