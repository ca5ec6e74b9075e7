#!/usr/bin/env bash
# Provision one Kaizen Edge station: its CURVE key pair, the hub's public key, the trusted
# pack-signing public keys, a station.toml, and the files the hub operator needs.
#
#   deploy/provision.sh --id line1/station-01 --hub-pub hub.pub --trusted trainer-2026.ed25519.pub \
#       [--groups line1,paint-shop] [--name line1-station-01] [--root /] [--kaizen /opt/kaizen/venv/bin/kaizen]
#
# Writes (ROOT defaults to /):
#   ROOT/etc/kaizen/keys/NAME.key, NAME.pub       station CURVE key pair (kaizen keys gen --kind curve)
#   ROOT/etc/kaizen/keys/hub.pub                  copy of --hub-pub (the hub's CURVE server key)
#   ROOT/etc/kaizen/keys/trusted/*.ed25519.pub    copies of every --trusted file (or folder's *.ed25519.pub)
#   ROOT/etc/kaizen/station.toml                  from deploy/station.toml, only if absent
#   ROOT/etc/kaizen/for-hub/NAME.pub + NAME.stations.toml   give these to the hub operator
#
# Idempotent: an existing key pair is kept (never regenerated), station.toml is never
# overwritten, copies are refreshed. No network, no systemctl: it only runs `kaizen keys gen`
# and copies files. Run as root on the station to also hand the secret key to the `kaizen` user.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "provision.sh: error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
id="" name="" root="/" hub_pub="" groups="" kaizen="${KAIZEN:-}"
trusted=()
while [ $# -gt 0 ]; do
    case "$1" in
        --id) id="${2:?--id needs a value}"; shift 2 ;;
        --name) name="${2:?--name needs a value}"; shift 2 ;;
        --root) root="${2:?--root needs a value}"; shift 2 ;;
        --hub-pub) hub_pub="${2:?--hub-pub needs a value}"; shift 2 ;;
        --trusted) trusted+=("${2:?--trusted needs a value}"); shift 2 ;;
        --groups) groups="${2:?--groups needs a value}"; shift 2 ;;
        --kaizen) kaizen="${2:?--kaizen needs a value}"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "provision.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
[ -n "$id" ] || die "--id STATION_ID is required (e.g. line1/station-01)"
[[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$ ]] || die "station id '$id': letters, digits, _ . : / - only"
[ -n "$name" ] || name="$(printf '%s' "$id" | tr '/:' '--')"
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "key name '$name': use a plain file name"
if [ -z "$kaizen" ]; then
    if [ -x /opt/kaizen/venv/bin/kaizen ]; then kaizen=/opt/kaizen/venv/bin/kaizen
    else kaizen="$(command -v kaizen)" || die "no kaizen command: pass --kaizen PATH"; fi
fi

etc="${root%/}/etc/kaizen"
keys="$etc/keys"
mkdir -p "$keys/trusted" "$etc/for-hub"
chmod 0750 "$etc" "$keys"

# 1. The station's CURVE key pair (kept if it exists: a new key would need a new allow-list entry).
if [ -e "$keys/$name.key" ] && [ -e "$keys/$name.pub" ]; then
    echo "keep   $keys/$name.key (existing key pair)"
elif [ -e "$keys/$name.key" ] || [ -e "$keys/$name.pub" ]; then
    die "only one of $keys/$name.key / $name.pub exists: remove it, then run again"
else
    "$kaizen" keys gen --kind curve --out "$keys" --name "$name"
fi

# 2. The hub's CURVE public key.
if [ -n "$hub_pub" ]; then
    [ -f "$hub_pub" ] || die "--hub-pub $hub_pub: no such file"
    cp -f -- "$hub_pub" "$keys/hub.pub.tmp" && mv -f -- "$keys/hub.pub.tmp" "$keys/hub.pub"
    chmod 0644 "$keys/hub.pub"
elif [ ! -e "$keys/hub.pub" ]; then
    echo "note   no --hub-pub given: copy the hub's hub.pub to $keys/hub.pub before starting" >&2
fi

# 3. Trusted pack-signing public keys (Ed25519, *.ed25519.pub). Never a secret key.
for t in ${trusted[@]+"${trusted[@]}"}; do
    if [ -d "$t" ]; then
        found=0
        for f in "$t"/*.ed25519.pub; do
            [ -e "$f" ] || continue
            cp -f -- "$f" "$keys/trusted/"; found=1
        done
        [ "$found" = 1 ] || die "--trusted $t: no *.ed25519.pub files in it"
    else
        case "$t" in *.ed25519.pub) ;; *) die "--trusted $t: expected a NAME.ed25519.pub file" ;; esac
        [ -f "$t" ] || die "--trusted $t: no such file"
        cp -f -- "$t" "$keys/trusted/"
    fi
done
chmod 0644 "$keys"/trusted/*.ed25519.pub 2>/dev/null || \
    echo "note   no trusted signing keys in $keys/trusted yet: the station refuses to start without one" >&2

# 4. station.toml from the example, with this station's id and key names (never overwritten).
if [ -e "$etc/station.toml" ]; then
    echo "keep   $etc/station.toml (existing)"
else
    sed -e "s|^station_id = \"[^\"]*\"|station_id = \"$id\"|" \
        -e "s|^public_key_file = \"[^\"]*\"|public_key_file = \"keys/$name.pub\"|" \
        -e "s|^secret_key_file = \"[^\"]*\"|secret_key_file = \"keys/$name.key\"|" \
        "$here/station.toml" > "$etc/station.toml.tmp"
    mv -f -- "$etc/station.toml.tmp" "$etc/station.toml"
    chmod 0640 "$etc/station.toml"
    echo "wrote  $etc/station.toml (edit hub_endpoint and bundle_dir)"
fi

# 5. What the hub operator adds to hub.toml's allow-list.
cp -f -- "$keys/$name.pub" "$etc/for-hub/$name.pub"
group_list=""
if [ -n "$groups" ]; then
    IFS=',' read -r -a parts <<< "$groups"
    for g in "${parts[@]}"; do group_list="${group_list:+$group_list, }\"$g\""; done
fi
cat > "$etc/for-hub/$name.stations.toml" <<EOF

[[stations]]
id = "$id"
public_key_file = "keys/stations/$name.pub"
groups = [$group_list]
EOF

# 6. The service user must read its secret key (keys gen writes it 0600 for the caller).
if [ "$(id -u)" = 0 ] && id kaizen >/dev/null 2>&1; then
    chown root:kaizen "$etc" "$keys" "$etc/station.toml"
    chown kaizen:kaizen "$keys/$name.key"
else
    echo "note   not root or no 'kaizen' user: make $keys/$name.key readable by the service user" >&2
fi

cat <<EOF
station $id provisioned under $etc
  hub operator: copy $etc/for-hub/$name.pub to the hub's keys/stations/$name.pub
                and append $etc/for-hub/$name.stations.toml to hub.toml, then restart kaizen-hub
  this station: systemctl enable --now kaizen-station
EOF
