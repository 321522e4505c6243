// The container registry azd pushes the bridge image to; the identity pulls with AcrPull (no admin user).
param name string
param location string
param tags object
param pullPrincipalId string

var acrPullRole = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '7f951dda-4ed3-4680-a7ca-43fe172d538d')

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  //checkov:skip=CKV_AZURE_139: public network access is needed: azd pushes from the developer's machine and the Container Apps environment has no virtual network; pulls are authenticated with Entra (AcrPull), no admin user
  //checkov:skip=CKV_AZURE_163: image vulnerability scanning is Microsoft Defender for Containers, a subscription-wide plan enabled outside this template
  //checkov:skip=CKV_AZURE_166: image quarantine needs the Premium tier
  //checkov:skip=CKV_AZURE_233: zone redundancy needs the Premium tier; a registry outage stops deployments, not calls
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  properties: {
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

resource acrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: registry
  name: guid(registry.id, pullPrincipalId, acrPullRole)
  properties: {
    principalId: pullPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: acrPullRole
  }
}

output name string = registry.name
output loginServer string = registry.properties.loginServer
