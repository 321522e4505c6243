// Azure OpenAI with a realtime model deployment. Keys are switched off: the bridge authenticates with
// the managed identity (Cognitive Services OpenAI User), which needs the custom subdomain.
param name string
param location string
param tags object
param deploymentName string
param model string
param modelVersion string
param capacity int
param userPrincipalId string

var openAiUserRole = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd')

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  //checkov:skip=CKV_AZURE_134: the Container Apps environment has no virtual network, so the account is reached over its public endpoint; keys are disabled and every call needs an Entra token with the OpenAI User role
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  identity: {
    type: 'SystemAssigned'
  }
  sku: {
    name: 'S0'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
    restrictOutboundNetworkAccess: true
    allowedFqdnList: []
  }
}

resource deployment 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = {
  parent: account
  name: deploymentName
  sku: {
    name: 'GlobalStandard'
    capacity: capacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: model
      version: modelVersion
    }
  }
}

resource openAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: account
  name: guid(account.id, userPrincipalId, openAiUserRole)
  properties: {
    principalId: userPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: openAiUserRole
  }
}

output endpoint string = 'https://${account.properties.customSubDomainName}.openai.azure.com'
output deploymentName string = deployment.name
