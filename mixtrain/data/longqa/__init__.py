"""Long-context QA examples (the paper's stage 3), built offline from any corpus.

Construction (docs/paper.md, "Long-context QA fine-tuning"):

1. Documents (the same sources as pretraining: ``data.source`` embedded/files/hub)
   are tokenised and cut into chunks of ``data.qa_chunk_tokens`` tokens (1024 in the
   paper; a document's tail shorter than a quarter chunk is dropped).
2. Each chunk gets one question-answer pair. ``data.qa_source``:

   - ``offline`` (default, no model needed): ``data.qa_generator`` = ``fact`` plants
     "The secret code of the <adjective noun> is <7 digits>." at a random sentence
     boundary of the chunk and asks for it; ``span`` quotes 8 consecutive words of the
     chunk and asks for the next 5; ``mixed`` picks one per chunk. Deterministic in
     ``data.seed``. ``module:function`` plugs in your own generator (e.g. an
     instruction model): ``f(chunk_text, rng) -> (context, question, answer)``, three
     strings, or None to skip the chunk.
   - ``jsonl`` (``data.qa_path``, a file or glob) or ``hf`` (``data.qa_hub_name``):
     an existing QA data set; each record's context is a chunk and its pair the pair
     (field names ``data.qa_{context,question,answer}_field``; an answer may be a
     string, a list of strings or SQuAD's ``{"text": [...]}``: the first is used).
     Records sharing a context count as one document. A record with a null (or empty)
     context, question or answer is skipped.

3. Chunks of *different* documents (and with different questions) are concatenated,
   separated by a blank line, until the next chunk and its QA pair would not fit in
   ``seq_len``; then all the example's QA pairs are appended in a shuffled order::

       <chunk 1>\\n\\n<chunk 2>\\n\\n ... <chunk k>\\n\\n
       Question: <q>\\nAnswer: <a><EOS>Question: <q>\\nAnswer: <a><EOS> ...

4. Loss on the answers only: ``labels`` is -100 everywhere except at the positions
   whose next token is an answer token or the EOS that ends an answer. One example is
   exactly one training sequence (never packed with another), padded to ``seq_len``
   with the pad id (labels -100). ``doc_ids`` is 0 for the whole example, so
   ``data.intra_doc_attention`` never hides the context from the questions.

Built once per (corpus, tokenizer, seq_len, QA settings) under
``<cache_dir>/longqa/<hash>/``.

Where each part lives: ``generators.py`` (offline QA generators, step 2),
``sources.py`` (chunking the corpus, or reading a QA data set: steps 1-2),
``packing.py`` (examples from chunks: step 3), ``build.py`` (the cached build),
``dataset.py`` (labels, step 4; the Dataset and the Lightning DataModule).
"""

from __future__ import annotations

from mixtrain.data.longqa.build import LONGQA_FORMAT, PreparedQA, build, longqa_dir, prepare_longqa
from mixtrain.data.longqa.dataset import LongQADataModule, LongQADataset
from mixtrain.data.longqa.generators import GENERATORS, LongQAError, fact_qa, offline_generator, span_qa
from mixtrain.data.longqa.packing import CHUNK_SEP, QAItem, assemble, encode_example, make_items
from mixtrain.data.longqa.sources import SOURCES, answer_text, chunk_documents, offline_pairs, plugin_pairs, qa_pairs

__all__ = [
    "CHUNK_SEP", "GENERATORS", "LONGQA_FORMAT", "SOURCES", "LongQADataModule", "LongQADataset", "LongQAError",
    "PreparedQA", "QAItem", "answer_text", "assemble", "build", "chunk_documents", "encode_example", "fact_qa", "longqa_dir",
    "make_items", "offline_generator", "offline_pairs", "plugin_pairs", "prepare_longqa", "qa_pairs", "span_qa",
]
