#!/usr/bin/env bash
# Every task from the shell, with Mosquitto's clients (Debian: mosquitto-clients), MQTT 5.
#
#   examples/mqtt-cli.sh list                 # the examples
#   examples/mqtt-cli.sh tokenize             # run one; prints the answer
#   examples/mqtt-cli.sh asr-raw speech.wav   # media examples take a file
#
# Environment: MQTT_HOST (localhost), MQTT_PORT (1883), DEVICE (dev-1: your device id, which is
# your MQTT username on a gateway with the shipped ACL), MQTT_OPTS (more client options, e.g.
# "-u dev-1 -P secret --cafile ca.crt" for the TLS listener on 8883).
#
# Two ways to ask (README.md "MQTT protocol"): a JSON envelope {"id", "params", input}, or raw
# MQTT 5 (payload = the text or media; request id in the correlation data; params as user
# properties; the media type as content type). `mosquitto_rr` sets the response topic and
# waits for the answer. It sends an empty payload with -f or -s (mosquitto 2.0.11), so files go
# through `mosquitto_pub` and a persistent session that holds the answer until we read it.
# A raw request with one output image is answered with the image bytes (content type set; id,
# task, status, result and timings as user properties: see them with mosquitto_sub -F '%C %P');
# an error is a JSON answer in both forms.
set -euo pipefail

H=${MQTT_HOST:-localhost}
P=${MQTT_PORT:-1883}
DEV=${DEVICE:-dev-1}
read -r -a OPTS <<< "${MQTT_OPTS:-}"
C=(-h "$H" -p "$P" -V mqttv5 "${OPTS[@]}")
WAIT=${WAIT:-600}  # s; a cold lcm job may take minutes

rr() {  # rr TASK ID [mosquitto_rr options...]: one request, print the answer
  local task=$1 id=$2; shift 2
  mosquitto_rr "${C[@]}" -q 1 -W "$WAIT" -t "edge/jobs/$task/$DEV" -e "edge/results/$DEV/$id" "$@"
}

rr_file() {  # rr_file TASK ID FILE|- [mosquitto_pub options...]: the payload from a file or stdin
  local task=$1 id=$2 file=$3; shift 3
  local sid="$DEV-cli-$id" topic="edge/results/$DEV/$id"
  # 1. subscribe in a session that outlives the client (the answer waits in it), 2. publish,
  # 3. come back to the session for the answer: no race between subscribing and publishing.
  mosquitto_sub "${C[@]}" -q 1 -c -i "$sid" -x 600 -t "$topic" -E
  if [ "$file" = - ]; then
    mosquitto_pub "${C[@]}" -q 1 -t "edge/jobs/$task/$DEV" -D publish response-topic "$topic" "$@" -s
  else
    mosquitto_pub "${C[@]}" -q 1 -t "edge/jobs/$task/$DEV" -D publish response-topic "$topic" "$@" -f "$file"
  fi
  mosquitto_sub "${C[@]}" -q 1 -c -i "$sid" -x 0 -t "$topic" -C 1 -W "$WAIT" "${FORMAT[@]}"
}
FORMAT=()

envelope_of() {  # envelope_of ID FILE [PARAMS_JSON]: {"id","data":base64,"params"} on stdout
  printf '{"id":"%s","params":%s,"data":"' "$1" "${3:-{\}}"
  base64 -w0 "$2"
  printf '"}'
}

case "${1:-list}" in
  list) sed -n 's/^  \([a-z-]*\))  *#/\1:/p' "$0" ;;
  tokenize)  # envelope: text or a list of texts -> token ids
    rr tokenize tok-1 -m '{"id":"tok-1","text":["hello world","edge"],"params":{"model":"all-minilm-l6-v2"}}' ;;
  tokenize-raw)  # raw MQTT 5: the text is the payload, params are user properties
    rr tokenize tok-2 -D publish correlation-data tok-2 -D publish content-type text/plain \
       -D publish user-property model all-minilm-l6-v2 -m 'hello world' ;;
  detokenize)  # envelope only: ids -> text
    rr detokenize detok-1 -m '{"id":"detok-1","ids":[101,7592,2088,102],"params":{"skip_special_tokens":true}}' ;;
  asr-raw)  # raw MQTT 5: a WAV file is the payload (file: $2)
    rr_file asr asr-1 "${2:?a WAV file}" -D publish correlation-data asr-1 \
       -D publish content-type audio/wav -D publish user-property timestamps true ;;
  asr)  # envelope: base64 WAV (file: $2)
    envelope_of asr-2 "${2:?a WAV file}" | rr_file asr asr-2 - ;;
  superres)  # envelope: base64 image in, base64 image(s) out in result.media (file: $2)
    envelope_of sr-1 "${2:?a PNG/JPEG/WebP file}" '{"format":"jpeg"}' | rr_file superres sr-1 - ;;
  superres-raw)  # raw MQTT 5: the image bytes in, the 4x image bytes out (into $OUT, else stdout)
    FORMAT=(-N)
    rr_file superres sr-2 "${2:?a PNG/JPEG/WebP file}" -D publish correlation-data sr-2 \
       -D publish user-property format png > "${OUT:-/dev/stdout}" ;;
  lcm)  # envelope: a prompt -> {"width","height","seed",...} + result.media (one PNG)
    rr lcm lcm-1 -m '{"id":"lcm-1","text":"a red bicycle","params":{"steps":4,"seed":7}}' ;;
  lcm-raw)  # raw MQTT 5: the prompt is the payload; the image bytes come back (into $OUT, else stdout)
    rr lcm lcm-2 -N -D publish correlation-data lcm-2 -D publish content-type text/plain \
       -D publish user-property steps 4 -m 'a red bicycle' > "${OUT:-/dev/stdout}" ;;
  progress)  # watch progress notes of this device's jobs (QoS 0), one line each
    mosquitto_sub "${C[@]}" -t "edge/progress/$DEV/#" -v -C "${2:-1}" -W "$WAIT" ;;
  status)  # the gateway's retained status document(s)
    mosquitto_sub "${C[@]}" -t 'edge/status/#' -C 1 -W 10 ;;
  *) echo "unknown example '$1' (try: $0 list)" >&2; exit 2 ;;
esac
