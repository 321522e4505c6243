// Blob storage for call recordings. Shared keys are off: the bridge reaches it with
// its managed identity (Storage Blob Data Contributor on the one container).
param name string
param location string
param tags object
param containerName string
param writerPrincipalId string
@description('Optional: the deploying user, given read access to the container.')
param userPrincipalId string = ''

var blobContributorRole = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'ba92f5b4-2d11-453d-a403-e96b0029c9fe')
var blobReaderRole = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1')

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_35: the Container Apps environment has no virtual network and no fixed outbound address to allow; shared keys and anonymous access are off, so every request needs an Entra token with a data role
  //checkov:skip=CKV_AZURE_59: as CKV_AZURE_35: the public endpoint is needed without a virtual network; no anonymous or shared-key access is possible
  //checkov:skip=CKV_AZURE_206: zone-redundant (ZRS) within the region; geo-replication of recordings is the operator's choice (change the SKU to Standard_GZRS)
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_ZRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobs
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}

resource writer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: container
  name: guid(container.id, writerPrincipalId, blobContributorRole)
  properties: {
    principalId: writerPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: blobContributorRole
  }
}

resource userReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  scope: container
  name: guid(container.id, userPrincipalId, blobReaderRole)
  properties: {
    principalId: userPrincipalId
    roleDefinitionId: blobReaderRole
  }
}

output blobEndpoint string = account.properties.primaryEndpoints.blob
