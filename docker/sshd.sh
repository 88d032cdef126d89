#!/usr/bin/env bash
# Run an ssh server in the container, as the container's user (no root needed), for the deepspeed
# launcher's ssh/pdsh multi-node mode:
#   docker run -d --network host -v KEYS:/home/rct/.ssh:ro ... --entrypoint /opt/rct-dist-docker/sshd.sh IMAGE
# Listens on $SSHD_PORT (default 2222); accepts only the public keys in ~/.ssh/authorized_keys (or
# $AUTHORIZED_KEYS); password logins are off. Host keys are made on first start, per container, in
# $SSHD_DIR (default ~/.sshd); mount a volume there to keep them across restarts.
set -euo pipefail
port=${SSHD_PORT:-2222}
dir=${SSHD_DIR:-$HOME/.sshd}
keys=${AUTHORIZED_KEYS:-$HOME/.ssh/authorized_keys}
mkdir -p -- "$dir"
chmod 700 -- "$dir"
for type in ed25519 rsa; do
    [[ -f $dir/ssh_host_${type}_key ]] || ssh-keygen -q -t "$type" -N '' -f "$dir/ssh_host_${type}_key"
done
[[ -s $keys ]] || echo "sshd.sh: warning: $keys is missing or empty: nobody can log in" >&2
cat > "$dir/sshd_config" <<CFG
Port $port
HostKey $dir/ssh_host_ed25519_key
HostKey $dir/ssh_host_rsa_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers $(id -un)
StrictModes no
PermitUserEnvironment no
Subsystem sftp internal-sftp
CFG
exec /usr/sbin/sshd -D -e -f "$dir/sshd_config"
