"""Persona datasets: every loader returns a `datasets.Dataset` with string columns persona, prompt, response, group.

``persona`` is ``<group>/<name>`` (``hamlet/hamlet``, ``m0/bianca``, ``amazon/cluster_3``; tweets use
``tweets/<author>``), ``group`` is the source a persona comes from (a play, a movie, an author, a user cluster):
`split_personas` keeps each group on one side so unseen personas share no source with pretraining ones.
"""

from .amazon import load_amazon_reviews, spherical_kmeans
from .cornell import load_cornell
from .errors import DataFileNotFoundError, DataFormatError
from .flags import DataArguments, load_persona_dataset, read_lines_file, sample_per_persona
from .shakespeare import load_shakespeare
from .splits import split_persona_examples, split_personas, summarize
from .text_persona import describe_personas
from .tweets import load_tweets

__all__ = [
    "DataArguments",
    "DataFileNotFoundError",
    "DataFormatError",
    "describe_personas",
    "load_amazon_reviews",
    "load_cornell",
    "load_persona_dataset",
    "load_shakespeare",
    "load_tweets",
    "read_lines_file",
    "sample_per_persona",
    "spherical_kmeans",
    "split_persona_examples",
    "split_personas",
    "summarize",
]
