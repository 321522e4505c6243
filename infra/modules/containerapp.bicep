// The Container Apps environment and the bridge's container app. Every environment variable set here is a
// setting bridge/config.py reads (tests/test_infra.py holds the two together), or one Azure's SDKs read
// (AZURE_CLIENT_ID, APPLICATIONINSIGHTS_CONNECTION_STRING).
param appName string
param environmentName string
param location string
param tags object
param image string
param identityId string
param identityClientId string
param identityName string
param registryServer string
param logAnalyticsName string
param appInsightsName string
param openAiEndpoint string
param openAiDeployment string
param openAiApiVersion string = ''
param twilioAuthTokenUri string
param bridgeAdminTokenUri string
param twilioAccountSid string = ''
param postgresHost string
param postgresDatabase string
param storageUrl string

@minValue(0)
@maxValue(540)
param drainSeconds int = 30
param maxCallsPerReplica int = 100
param scaleAtCallsPerReplica int = 50
param maxReplicas int = 10

var port = 8080
// After the drain, the bridge lets the model say goodbye for up to 10 s before it hangs up.
var goodbyeSeconds = 10
// Headroom for closing sockets and writing the last call records before SIGKILL.
var shutdownMarginSeconds = 20
var terminationGraceSeconds = drainSeconds + goodbyeSeconds + shutdownMarginSeconds

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: logAnalyticsName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: environmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
  }
}

// The app's own address, known before the app exists: Twilio signs its requests over it.
var publicUrl = 'https://${appName}.${environment.properties.defaultDomain}'

var baseEnv = [
  { name: 'AZURE_CLIENT_ID', value: identityClientId }
  { name: 'AZURE_OPENAI_ENDPOINT', value: openAiEndpoint }
  { name: 'AZURE_OPENAI_DEPLOYMENT', value: openAiDeployment }
  { name: 'TWILIO_AUTH_TOKEN', secretRef: 'twilio-auth-token' }
  { name: 'BRIDGE_PUBLIC_URL', value: publicUrl }
  { name: 'BRIDGE_ADMIN_TOKEN', secretRef: 'bridge-admin-token' }
  // No password: the bridge signs in as its managed identity with an Entra token.
  {
    name: 'BRIDGE_DATABASE'
    value: 'postgresql://${identityName}@${postgresHost}:5432/${postgresDatabase}?sslmode=require'
  }
  { name: 'BRIDGE_STORAGE_URL', value: storageUrl }
  { name: 'BRIDGE_HOST', value: '0.0.0.0' }
  { name: 'BRIDGE_PORT', value: string(port) }
  { name: 'BRIDGE_DRAIN_SECONDS', value: string(drainSeconds) }
  { name: 'BRIDGE_MAX_CALLS', value: string(maxCallsPerReplica) }
  { name: 'BRIDGE_LOG_LEVEL', value: 'INFO' }
  { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', secretRef: 'appinsights-connection-string' }
]
var apiVersionEnv = empty(openAiApiVersion) ? [] : [{ name: 'AZURE_OPENAI_API_VERSION', value: openAiApiVersion }]
var accountSidEnv = empty(twilioAccountSid) ? [] : [{ name: 'TWILIO_ACCOUNT_SID', value: twilioAccountSid }]

resource app 'Microsoft.App/containerApps@2024-03-01' = {
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'bridge' })
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    managedEnvironmentId: environment.id
    configuration: {
      // One revision at a time: a deployment starts the new revision, moves traffic once it is ready,
      // then stops the old replicas with SIGTERM, and they drain.
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: port
        // Twilio's webhooks are HTTP/1.1 and its media stream is a WebSocket; Container Apps ingress
        // carries WebSockets on 'auto' and 'http'.
        transport: 'auto'
        allowInsecure: false
        traffic: [
          {
            latestRevision: true
            weight: 100
          }
        ]
      }
      registries: [
        {
          server: registryServer
          identity: identityId
        }
      ]
      secrets: [
        { name: 'twilio-auth-token', keyVaultUrl: twilioAuthTokenUri, identity: identityId }
        { name: 'bridge-admin-token', keyVaultUrl: bridgeAdminTokenUri, identity: identityId }
        { name: 'appinsights-connection-string', value: appInsights.properties.ConnectionString }
      ]
    }
    template: {
      terminationGracePeriodSeconds: terminationGraceSeconds
      containers: [
        {
          name: 'bridge'
          image: image
          resources: {
            cpu: json('1.0')
            memory: '2Gi'
          }
          env: concat(baseEnv, apiVersionEnv, accountSidEnv)
          probes: [
            {
              type: 'Startup'
              httpGet: { path: '/healthz', port: port }
              periodSeconds: 2
              failureThreshold: 30
            }
            {
              type: 'Liveness'
              httpGet: { path: '/healthz', port: port }
              periodSeconds: 10
              timeoutSeconds: 3
              failureThreshold: 3
            }
            {
              // 503 while draining (SIGTERM) or full (BRIDGE_MAX_CALLS): no new calls are sent here.
              type: 'Readiness'
              httpGet: { path: '/readyz', port: port }
              periodSeconds: 5
              timeoutSeconds: 3
              failureThreshold: 2
              successThreshold: 1
            }
          ]
        }
      ]
      scale: {
        // Always one warm replica: a call must not wait for a cold start.
        minReplicas: 1
        maxReplicas: maxReplicas
        rules: [
          {
            // Container Apps has no "calls" metric; KEDA's HTTP concurrency is the practical proxy, since
            // each live call holds one WebSocket (one long-lived request) open to its replica.
            name: 'concurrent-calls'
            http: {
              metadata: {
                concurrentRequests: string(scaleAtCallsPerReplica)
              }
            }
          }
        ]
      }
    }
  }
}

output name string = app.name
output url string = 'https://${app.properties.configuration.ingress.fqdn}'
