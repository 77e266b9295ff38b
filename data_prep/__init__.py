"""data_prep: the agentic mixture (Hermes, Glaive, GSM8K, Turing) from the raw published files.

One module per source turns a raw record into chat messages plus its step type; `build` mixes,
splits, tokenises and stores them, counting every record as used, malformed (by reason) or unused.

    python -m data_prep --out data/agentic                # download the pinned raw files, build
    python -m data_prep --source-dir RAW --out DIR --tokenizer T  # raw files laid out as on the Hub
"""
