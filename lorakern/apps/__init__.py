"""The applications built on lorakern's kernels, formats and modules (the library itself is everything
outside this package):

* :mod:`lorakern.apps.evaluation`: perplexity on WikiText-2 and decode speed (the demo's figures);
* :mod:`lorakern.apps.train`: LoRA fine-tuning, the adapter suite's tasks and their metrics;
* :mod:`lorakern.apps.dlp`: DLP-LoRA, a router that mixes adapters per prompt;
* :mod:`lorakern.apps.icm`: ICM-LoRA, a conditional VAE that generates adapters from task examples.
"""
