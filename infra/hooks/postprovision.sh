#!/bin/sh
# azd postprovision hook: print the webhook URL to give Twilio and, when TWILIO_ACCOUNT_SID,
# TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER are set (in the azd environment or the shell), point that
# number's voice webhook at the bridge through Twilio's REST API. The auth token is passed to curl on
# its standard input, never on a command line, and never printed.
set -eu

if [ -z "${BRIDGE_WEBHOOK_URL:-}" ]; then
  BRIDGE_WEBHOOK_URL=$(azd env get-value BRIDGE_WEBHOOK_URL 2>/dev/null || true)
fi
if [ -z "${BRIDGE_WEBHOOK_URL:-}" ]; then
  echo "postprovision: BRIDGE_WEBHOOK_URL is not in the azd environment; did provisioning finish?" >&2
  exit 1
fi

echo ""
echo "Twilio webhook (A call comes in → Webhook, HTTP POST):"
echo "  $BRIDGE_WEBHOOK_URL"
echo ""

sid=${TWILIO_ACCOUNT_SID:-}
number=${TWILIO_PHONE_NUMBER:-}
if [ -z "$sid" ] || [ -z "$number" ] || [ -z "${TWILIO_AUTH_TOKEN:-}" ]; then
  echo "Set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER (E.164, e.g. +14155550123) and run"
  echo "'azd hooks run postprovision' to set it on the number, or paste it in the Twilio Console."
  exit 0
fi

api="https://api.twilio.com/2010-04-01/Accounts/$sid"
# curl reads "user = SID:TOKEN" from its standard input (-K -): the token stays out of the process list.
twilio() {
  printf 'user = "%s:%s"\n' "$sid" "$TWILIO_AUTH_TOKEN" | curl --silent --show-error --fail --config - "$@"
}

listing=$(twilio --get "$api/IncomingPhoneNumbers.json" --data-urlencode "PhoneNumber=$number")
number_sid=$(printf '%s' "$listing" | grep -o '"sid": *"PN[0-9a-fA-F]\{32\}"' | head -n 1 | grep -o 'PN[0-9a-fA-F]\{32\}' || true)
if [ -z "$number_sid" ]; then
  echo "postprovision: $number is not a number of account $sid; paste the URL above in the Twilio Console" >&2
  exit 1
fi

twilio --output /dev/null "$api/IncomingPhoneNumbers/$number_sid.json" \
  --data-urlencode "VoiceUrl=$BRIDGE_WEBHOOK_URL" --data-urlencode "VoiceMethod=POST"
echo "Twilio: $number ($number_sid) now sends its calls to $BRIDGE_WEBHOOK_URL"
