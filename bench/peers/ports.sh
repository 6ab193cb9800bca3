# The peers' ports on 127.0.0.1, for the scripts under bench/ (sourced). The configs in
# bench/peers/ name the same ports; a NAME=PATH peer (another streamgate) takes
# streamgate's.
# shellcheck disable=SC2034
declare -A PEER_PORTS=([origin]=18180 [streamgate]=18186 [floor]=18187 [nginx]=18188
  [haproxy]=18189 [floor-ns]=18190 [caddy]=18191)
