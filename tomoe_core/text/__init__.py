"""Text sources: the default Wikipedia extract, local files and folders, HF datasets (`sources`), CoNLL-U
treebanks (`treebank`), and the error they raise (`files`). Torch-free until tokens are made."""
