# A local CA and certificates it signs, for `scripts/up --tls` and
# `TLS=1 bench/proxy`. Sourced, not run; the caller defines `info`.
# shellcheck shell=bash

# ensure_local_ca DIR: a CA for the local stack's certificates (ECDSA
# P-256, ten years), made once in DIR (ca.key 0600).
ensure_local_ca() {
  local dir=$1
  if [ -s "$dir/ca.pem" ] && [ -s "$dir/ca.key" ]; then
    info "using the local CA in ${dir#"$ROOT"/}"
    return
  fi
  (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key")
  openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 -subj "/CN=OpenCloud local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.pem" 2>/dev/null
  info "made a local CA: ${dir#"$ROOT"/}/ca.pem"
}

# issue_local_cert DIR NAME DNS: DIR/NAME.pem and NAME.key for DNS, signed
# by DIR's CA; kept while it has more than 30 days left.
issue_local_cert() {
  local dir=$1 name=$2 dns=$3
  if [ -s "$dir/$name.pem" ] && openssl x509 -checkend 2592000 -noout -in "$dir/$name.pem" >/dev/null 2>&1 \
     && openssl verify -CAfile "$dir/ca.pem" "$dir/$name.pem" >/dev/null 2>&1; then
    return
  fi
  (umask 077 && openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$name.key")
  openssl req -new -key "$dir/$name.key" -subj "/CN=$dns" -out "$dir/$name.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$dns" >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 397 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
  info "issued $name.pem for $dns"
}
