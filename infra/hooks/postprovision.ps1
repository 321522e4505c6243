# azd postprovision hook (Windows twin of postprovision.sh): print the webhook URL to give Twilio and, when
# TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER are set, point that number's voice webhook
# at the bridge through Twilio's REST API. The auth token is never printed.
$ErrorActionPreference = 'Stop'

$webhook = $env:BRIDGE_WEBHOOK_URL
if (-not $webhook) { $webhook = (azd env get-value BRIDGE_WEBHOOK_URL 2>$null) }
if (-not $webhook) {
    Write-Error 'postprovision: BRIDGE_WEBHOOK_URL is not in the azd environment; did provisioning finish?'
}

Write-Host ''
Write-Host 'Twilio webhook (A call comes in -> Webhook, HTTP POST):'
Write-Host "  $webhook"
Write-Host ''

$sid = $env:TWILIO_ACCOUNT_SID
$number = $env:TWILIO_PHONE_NUMBER
if (-not $sid -or -not $number -or -not $env:TWILIO_AUTH_TOKEN) {
    Write-Host 'Set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER (E.164, e.g. +14155550123) and run'
    Write-Host "'azd hooks run postprovision' to set it on the number, or paste it in the Twilio Console."
    exit 0
}

$api = "https://api.twilio.com/2010-04-01/Accounts/$sid"
$token = ConvertTo-SecureString $env:TWILIO_AUTH_TOKEN -AsPlainText -Force
$credential = New-Object System.Management.Automation.PSCredential ($sid, $token)

$listing = Invoke-RestMethod -Method Get -Uri "$api/IncomingPhoneNumbers.json" -Authentication Basic `
    -Credential $credential -Body @{ PhoneNumber = $number }
$match = @($listing.incoming_phone_numbers) | Select-Object -First 1
if (-not $match) {
    Write-Error "postprovision: $number is not a number of account $sid; paste the URL above in the Twilio Console"
}

Invoke-RestMethod -Method Post -Uri "$api/IncomingPhoneNumbers/$($match.sid).json" -Authentication Basic `
    -Credential $credential -Body @{ VoiceUrl = $webhook; VoiceMethod = 'POST' } | Out-Null
Write-Host "Twilio: $number ($($match.sid)) now sends its calls to $webhook"
