"""The one place that imports libp2p: hosts, framed streams and pubsub for both daemons.

- `identity`: persistent Ed25519 identity in a 0600 key file, as libp2p and `cryptography` keys.
- `host`: `open_host`, a py-libp2p host with Noise + Yamux only, one connection per peer (two for
  relay clients: relayed + hole-punched), optional relay service, relay client and DCUtR, and
  GossipSub tuned for small federations.
- `streams`: length-prefixed frames with size caps and timeouts; request/response helpers.
- `directory`: members' signed peer records published to and served by the CPM.
- `nat`: members-only circuit relay v2 (`MemberRelay`), reservations and relayed dials
  (`RelayClient`), the dial-back probe, connection kinds (direct / relayed / hole-punched).
- `reach`: the dial-back exchange (`DialBackService`, `check_reachability`) and `keep_reservation`.
"""
