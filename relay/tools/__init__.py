"""Tools that run beside the relay, not in it: `outbox-relay drill` (a fault drill that proves
"no loss, order per aggregate" on a real setup, with its faults and its cut-off proxy) and
`outbox-relay demo`. The daemon's own modules never import these."""
