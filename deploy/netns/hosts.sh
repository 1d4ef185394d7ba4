#!/usr/bin/env bash
# Hosts on one machine: network namespaces for a prefill, a decode and a router host,
# joined by veth pairs through a bridge, each link shaped with tc. Needs root.
#
#   hosts.sh up    NAME RATE [DELAY]   create NAME-prefill (.1), NAME-decode (.2) and
#                                      NAME-router (.3) on 10.77.N.0/24 (N from NAME),
#                                      this host at .254 on the bridge
#   hosts.sh shape NAME RATE [DELAY]   reshape every link (e.g. 1gbit 200us)
#   hosts.sh down  NAME                remove all of it (safe to repeat)
#   hosts.sh addr  NAME ROLE           print ROLE's address (prefill, decode, router, this)
#
# RATE is tc's (10gbit, 1gbit, 100mbit); DELAY (e.g. 50us) needs sch_netem: on a kernel
# without it the links are rate-shaped only, and `shape` says so on stderr and prints
# "delay=none". NAME: up to 8 letters and digits.
set -Eeuo pipefail

cmd=${1:?usage: hosts.sh up|shape|down|addr NAME ...}
name=${2:?NAME}
[[ $name =~ ^[a-z0-9]{1,8}$ ]] || { echo "NAME: 1 to 8 lowercase letters and digits" >&2; exit 2; }
# A subnet per NAME (`up` refuses one that another harness holds).
net="10.77.$(( $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 250 ))"
roles=(prefill decode router)
br="${name}-br"

addr() {
  case $1 in
    prefill) echo "$net.1" ;; decode) echo "$net.2" ;; router) echo "$net.3" ;; this) echo "$net.254" ;;
    *) echo "ROLE: prefill, decode, router or this" >&2; return 2 ;;
  esac
}

shape() {
  local rate=$1 delay=${2:-} applied=none
  # Bytes a tbf may send at once: 200 us at the rate, at least 64 KiB (a GSO segment). A
  # larger bucket lets a short transfer run at the veth's own speed.
  local bps burst
  bps=$(tc_rate_bytes "$rate")
  burst=$(( bps / 5000 > 65536 ? bps / 5000 : 65536 ))
  for r in "${roles[@]}"; do
    local ns="${name}-${r}" dev="eth0"
    if [[ -n $delay ]] && ip netns exec "$ns" tc qdisc replace dev "$dev" root netem delay "$delay" rate "$rate" limit 100000 2>/dev/null; then
      applied=$delay
    else
      ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency 200ms
    fi
    # The bridge side too, so both directions cross a shaped link.
    if [[ $applied != none ]]; then
      tc qdisc replace dev "${name}-${r:0:1}" root netem delay "$delay" rate "$rate" limit 100000
    else
      tc qdisc replace dev "${name}-${r:0:1}" root tbf rate "$rate" burst "$burst" latency 200ms
    fi
  done
  if [[ -n $delay && $applied == none ]]; then
    echo "hosts.sh: delay $delay not applied: this kernel has no sch_netem; links are rate-shaped only" >&2
  fi
  echo "rate=$rate delay=$applied"
}

# tc's rate units (bit-based: kbit, mbit, gbit) to bytes per second.
tc_rate_bytes() {
  local r=${1,,} n unit
  n=${r%%[a-z]*}; unit=${r#"$n"}
  case $unit in
    gbit) echo $(( n * 1000000000 / 8 )) ;; mbit) echo $(( n * 1000000 / 8 )) ;;
    kbit) echo $(( n * 1000 / 8 )) ;; bit|"") echo $(( n / 8 )) ;;
    *) echo "RATE: a number and kbit, mbit or gbit" >&2; return 2 ;;
  esac
}

down() {
  for r in "${roles[@]}"; do
    ip netns del "${name}-${r}" 2>/dev/null || true
    ip link del "${name}-${r:0:1}" 2>/dev/null || true
  done
  ip link del "$br" 2>/dev/null || true
}

case $cmd in
  up)
    rate=${3:?RATE}
    down
    if ip -4 route show | grep -q "^$net.0/24 "; then
      echo "hosts.sh: $net.0/24 is in use (another harness?); choose another NAME" >&2
      exit 1
    fi
    trap down ERR
    ip link add "$br" type bridge
    ip addr add "$(addr this)/24" dev "$br"
    ip link set "$br" up
    for r in "${roles[@]}"; do
      ns="${name}-${r}"
      ip netns add "$ns"
      ip link add "${name}-${r:0:1}" type veth peer name eth0 netns "$ns"
      ip link set "${name}-${r:0:1}" master "$br" up
      ip netns exec "$ns" ip addr add "$(addr "$r")/24" dev eth0
      ip netns exec "$ns" ip link set eth0 up
      ip netns exec "$ns" ip link set lo up
    done
    shape "$rate" "${4:-}"
    ;;
  shape) shape "${3:?RATE}" "${4:-}" ;;
  down) down ;;
  addr) addr "${3:?ROLE}" ;;
  *) echo "usage: hosts.sh up|shape|down|addr NAME ..." >&2; exit 2 ;;
esac
