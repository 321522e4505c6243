// The bridge on Azure: `azd up` provisions this, then builds the image and deploys it to the container app.
// One resource group holds everything; names carry a token derived from the subscription, the azd
// environment name and the region, so that each environment gets its own set.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; used in the resource group name and the names of resources.')
param environmentName string

@description('Region for every resource. The realtime models are offered in East US 2 and Sweden Central.')
@allowed([
  'eastus2'
  'swedencentral'
])
param location string

@description('Realtime model to deploy.')
param openAiModel string = 'gpt-realtime'

@description('Version of the realtime model.')
param openAiModelVersion string = '2025-08-28'

@description('Capacity of the model deployment, in thousands of tokens per minute.')
@minValue(1)
param openAiCapacity int = 10

@description('Name of the model deployment (AZURE_OPENAI_DEPLOYMENT).')
param openAiDeployment string = 'gpt-realtime'

@description('Empty: the GA Realtime protocol. An api-version such as 2025-04-01-preview: the preview protocol (AZURE_OPENAI_API_VERSION).')
param openAiApiVersion string = ''

@secure()
@description('Twilio auth token: stored in Key Vault, given to the app as TWILIO_AUTH_TOKEN.')
param twilioAuthToken string

@secure()
@description('Admin UI token (16+ random characters): stored in Key Vault, given to the app as BRIDGE_ADMIN_TOKEN.')
param bridgeAdminToken string

@description('Twilio account SID (not a secret); optional.')
param twilioAccountSid string = ''

@description('BRIDGE_DRAIN_SECONDS: how long live calls may continue after SIGTERM.')
@minValue(0)
@maxValue(540)
param drainSeconds int = 30

@description('BRIDGE_MAX_CALLS: calls one replica takes at once; above it /readyz says full.')
@minValue(1)
param maxCallsPerReplica int = 100

@description('Concurrent HTTP requests (live calls: one WebSocket each) per replica at which another replica is added.')
@minValue(1)
param scaleAtCallsPerReplica int = 50

@description('Most replicas the app scales out to.')
@minValue(1)
@maxValue(300)
param maxReplicas int = 10

@description('Whether the container app already exists (azd sets it); if so, its current image is kept on re-provision.')
param bridgeExists bool = false

@description('Object id of the user running azd (azd sets it); given access to the recordings container. Optional.')
param principalId string = ''

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var recordingsContainer = 'bridge'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-bridge-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    appInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module registry 'modules/registry.bicep' = {
  name: 'registry'
  scope: rg
  params: {
    name: 'cr${resourceToken}'
    location: location
    tags: tags
    pullPrincipalId: identity.outputs.principalId
  }
}

module openAi 'modules/openai.bicep' = {
  name: 'openai'
  scope: rg
  params: {
    name: 'oai-${resourceToken}'
    location: location
    tags: tags
    deploymentName: openAiDeployment
    model: openAiModel
    modelVersion: openAiModelVersion
    capacity: openAiCapacity
    userPrincipalId: identity.outputs.principalId
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    readerPrincipalId: identity.outputs.principalId
    twilioAuthToken: twilioAuthToken
    bridgeAdminToken: bridgeAdminToken
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    containerName: recordingsContainer
    writerPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
  }
}

module postgres 'modules/postgres.bicep' = {
  name: 'postgres'
  scope: rg
  params: {
    name: 'psql-${resourceToken}'
    location: location
    tags: tags
    adminPrincipalId: identity.outputs.principalId
    adminPrincipalName: identity.outputs.name
  }
}

module currentImage 'modules/current-image.bicep' = {
  name: 'current-image'
  scope: rg
  params: {
    exists: bridgeExists
    appName: 'ca-bridge-${resourceToken}'
  }
}

module app 'modules/containerapp.bicep' = {
  name: 'containerapp'
  scope: rg
  params: {
    appName: 'ca-bridge-${resourceToken}'
    environmentName: 'cae-${resourceToken}'
    location: location
    tags: tags
    image: currentImage.outputs.image
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    identityName: identity.outputs.name
    registryServer: registry.outputs.loginServer
    logAnalyticsName: monitoring.outputs.logAnalyticsName
    appInsightsName: monitoring.outputs.appInsightsName
    openAiEndpoint: openAi.outputs.endpoint
    openAiDeployment: openAi.outputs.deploymentName
    openAiApiVersion: openAiApiVersion
    twilioAuthTokenUri: keyVault.outputs.twilioAuthTokenUri
    bridgeAdminTokenUri: keyVault.outputs.bridgeAdminTokenUri
    twilioAccountSid: twilioAccountSid
    postgresHost: postgres.outputs.host
    postgresDatabase: postgres.outputs.databaseName
    storageUrl: '${storage.outputs.blobEndpoint}${recordingsContainer}'
    drainSeconds: drainSeconds
    maxCallsPerReplica: maxCallsPerReplica
    scaleAtCallsPerReplica: scaleAtCallsPerReplica
    maxReplicas: maxReplicas
  }
  // The identity must be able to pull the image and read the secrets before the first revision starts.
  dependsOn: [
    registry
    keyVault
  ]
}

// azd saves these in the environment (.azure/<env>/.env); the hooks read them. No secret is output.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = registry.outputs.loginServer
output AZURE_CONTAINER_REGISTRY_NAME string = registry.outputs.name
output AZURE_OPENAI_ENDPOINT string = openAi.outputs.endpoint
output AZURE_OPENAI_DEPLOYMENT string = openAi.outputs.deploymentName
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output BRIDGE_STORAGE_URL string = '${storage.outputs.blobEndpoint}${recordingsContainer}'
output BRIDGE_POSTGRES_HOST string = postgres.outputs.host
output SERVICE_BRIDGE_NAME string = app.outputs.name
output BRIDGE_PUBLIC_URL string = app.outputs.url
output BRIDGE_WEBHOOK_URL string = '${app.outputs.url}/twilio/voice'
