"""The one place that imports libp2p: hosts, framed streams and pubsub for both daemons.

- `identity`: persistent Ed25519 identity in a 0600 key file, as libp2p and `cryptography` keys.
- `host`: `open_host`, a py-libp2p host with Noise + Yamux only, one connection per peer, and
  GossipSub tuned for small federations.
- `streams`: length-prefixed frames with size caps and timeouts; request/response helpers.
"""
