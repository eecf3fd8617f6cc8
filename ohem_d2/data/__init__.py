"""Datasets of a run: registration from the command line or the config (``datasets``), the check
of every training and test set before anything trains (``checks`` judges what ``scan`` reads from
the annotation files and ``image_files`` from the image headers, cached by ``scan_cache``;
``class_checks`` judges their classes against each other and the model's number of classes), and
the embedded synthetic look-alike dataset (``synthetic``). Nothing here imports the OHEM heads."""
