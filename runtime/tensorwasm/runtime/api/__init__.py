"""HTTP API of the runtime shard: translates HTTP to domain calls and RuntimeFault to error envelopes."""
